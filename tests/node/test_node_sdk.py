"""Devices and modules using the official Azure IoT device SDK for Node.js
(azure-iot-device + azure-iot-device-mqtt, and -amqp where a test says so;
versions pinned in package-lock.json),
unchanged, pointed at the gateway with GatewayHostName and its CA. Each
scenario is a run of sdk.js; the SDK always dials port 8883 (MQTT), 5671
(AMQP) or 443 (either over WebSocket), so the hub listens on those ports of
127.0.0.1 here. scripts/test installs the packages with
`npm ci` outside the clone and passes their folder in EDGEHUB_NODE_MODULES."""

import base64
import json
import os
import queue
import subprocess
import threading
import time
import urllib.error
from pathlib import Path

import pytest
from conftest import start_sdk_gateway

HERE = Path(__file__).resolve().parent
DEV_KEY = base64.b64encode(b"node-device-primary-key-012345678").decode()
MOD_KEY = base64.b64encode(b"node-module-primary-key-012345678").decode()
MOD2_KEY = base64.b64encode(b"node-module-two-primary-key-01234").decode()
HUB = "myhub.azure-devices.net"


def node_modules():
    d = os.environ.get("EDGEHUB_NODE_MODULES")
    if not d or not Path(d, "azure-iot-device").is_dir():
        pytest.fail("EDGEHUB_NODE_MODULES must name the npm-installed tests/node packages (scripts/test does)")
    return d


def start_gateway(start_hub, tmp_path, *args):
    return start_sdk_gateway(start_hub, tmp_path, HUB, ("node-dev", DEV_KEY),
                             [("node-mod", MOD_KEY), ("node-mod2", MOD2_KEY)], *args)


@pytest.fixture
def gateway(start_hub, tmp_path):
    return start_gateway(start_hub, tmp_path)


def device_cs(key=DEV_KEY):
    return f"HostName={HUB};DeviceId=node-dev;SharedAccessKey={key};GatewayHostName=localhost"


def module_cs(module, key):
    return f"HostName={HUB};DeviceId=node-dev;ModuleId={module};SharedAccessKey={key};GatewayHostName=localhost"


class Scenario:
    """sdk.js running one scenario: its JSON events, commands on stdin."""

    def __init__(self, gateway, name, cs, transport="mqtt", **extra_env):
        env = dict(os.environ, EDGEHUB_CS=cs, EDGEHUB_CA=str(gateway.ca), NODE_PATH=node_modules(),
                   EDGEHUB_TRANSPORT=transport, **extra_env)
        self.proc = subprocess.Popen(
            ["node", str(HERE / "sdk.js"), name], env=env, text=True,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.events: "queue.Queue[dict]" = queue.Queue()
        self.stderr = []

        def pump():
            for line in self.proc.stdout:
                self.events.put(json.loads(line))

        def pump_err():
            for line in self.proc.stderr:
                self.stderr.append(line)

        threading.Thread(target=pump, daemon=True).start()
        threading.Thread(target=pump_err, daemon=True).start()

    def next(self, key, timeout=15):
        """The next event that carries `key` (an error event fails the test)."""
        deadline = time.time() + timeout
        while True:
            try:
                e = self.events.get(timeout=max(0.05, deadline - time.time()))
            except queue.Empty:
                raise AssertionError(f"no {key!r} event within {timeout} s; stderr: {''.join(self.stderr)}")
            if "error" in e:
                raise AssertionError(f"scenario failed: {e}; stderr: {''.join(self.stderr)}")
            if key in e:
                return e

    def finish(self, timeout=20):
        if self.proc.stdin and not self.proc.stdin.closed:
            self.proc.stdin.close()
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError("the Node SDK scenario did not end")
        return rc


@pytest.fixture
def scenario(gateway):
    running = []

    def start(name, cs=None, transport="mqtt", **env):
        s = Scenario(gateway, name, cs or device_cs(), transport=transport, **env)
        running.append(s)
        return s

    yield start
    for s in running:
        if s.proc.poll() is None:
            s.proc.kill()
            s.proc.wait()


def api_status(hub, method, path, body=None):
    try:
        return 200, hub.api(method, path, body)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


@pytest.mark.parametrize("transport", ["mqtt", "mqttws", "amqpws"])
def test_telemetry_with_properties_is_stored_as_sent(gateway, scenario, transport):
    s = scenario("telemetry", transport=transport)
    for i in range(3):
        s.next("sent")
    assert s.finish() == 0
    out = gateway.outbox()
    assert [json.loads(base64.b64decode(m["body"])) for m in out] == [{"n": 0}, {"n": 1}, {"n": 2}]
    for i, m in enumerate(out):
        assert m["properties"] == {"kind": "test"}, "no trailing '/' in any value"
        sp = m["system_properties"]
        assert sp["connectionDeviceId"] == "node-dev"
        assert sp["contentType"] == "application/json"
        assert sp["contentEncoding"] == "utf-8"
        assert sp["messageId"] == f"node-{i}"


def test_module_output_reaches_another_modules_input_through_a_route(start_hub, tmp_path):
    routes = tmp_path / "routes.json"
    routes.write_text(json.dumps({"schemaVersion": "1.1", "storeAndForwardConfiguration": {"timeToLiveSecs": 7200}, "routes": {
        "m2m": 'FROM /messages/modules/node-mod/outputs/out1 INTO BrokeredEndpoint("/modules/node-mod2/inputs/in1")',
    }}))
    gateway = start_gateway(start_hub, tmp_path, "--routes", str(routes))
    receiver = Scenario(gateway, "input", module_cs("node-mod2", MOD2_KEY))
    sender = None
    try:
        receiver.next("ready")
        sender = Scenario(gateway, "output", module_cs("node-mod", MOD_KEY))
        sender.next("sent")
        assert sender.finish() == 0
        got = receiver.next("input")
        assert got["input"] == "in1"
        assert json.loads(got["body"]) == {"temp": 42}
        assert got["properties"]["unit"] == "C"
        # As from IoT Edge: the sender's identity and output name come along
        # in the bag, and the Node SDK shows them as properties.
        assert got["properties"].get("$.cdid") == "node-dev", got
        assert got["properties"].get("$.cmid") == "node-mod", got
        assert got["properties"].get("$.on") == "out1", got
    finally:
        receiver.finish()
        if sender and sender.proc.poll() is None:
            sender.proc.kill()
    assert gateway.metrics().get('edgehub_messages_dropped_total{reason="no_route"}', 0) == 0
    # Completed by the SDK: nothing left queued for the input.
    deadline = time.time() + 10
    endpoint = 'BrokeredEndpoint("/modules/node-mod2/inputs/in1")'
    while gateway.outbox(endpoint=endpoint) and time.time() < deadline:
        time.sleep(0.05)
    assert gateway.outbox(endpoint=endpoint) == []


@pytest.mark.parametrize("transport", ["mqtt", "mqttws", "amqpws"])
def test_cloud_to_device_message_arrives_and_is_completed(gateway, scenario, transport):
    s = scenario("c2d", transport=transport)
    s.next("ready")
    gateway.api("POST", "/api/devices/node-dev/messages",
                {"body": "hello node", "properties": {"kind": "cmd"}, "messageId": "c2d-1"})
    m = s.next("c2d")
    assert m["c2d"] == "hello node"
    assert m["messageId"] == "c2d-1"
    assert m["properties"]["kind"] == "cmd"
    deadline = time.time() + 10
    while gateway.outbox(endpoint="c2d:node-dev") and time.time() < deadline:
        time.sleep(0.05)
    assert gateway.outbox(endpoint="c2d:node-dev") == []
    s.finish()


@pytest.mark.parametrize("transport", ["mqtt", "amqp", "mqttws", "amqpws"])
def test_twin_desired_and_a_refused_reported_patch(gateway, scenario, transport):
    status, _ = api_status(gateway, "PATCH", "/twins/node-dev", {"properties": {"desired": {"rate": 5}}})
    assert status == 200
    s = scenario("twin", transport=transport)
    assert s.next("desired")["desired"]["rate"] == 5
    assert s.next("reported")["reported"] == "ok"
    refused = s.next("refused")["refused"]
    assert refused != "accepted", "the SDK must see the gateway's 400 as a failure"
    assert "bad name" in refused["message"], refused
    s.next("ready")
    status, twin = api_status(gateway, "PATCH", "/twins/node-dev", {"properties": {"desired": {"rate": 7}}})
    assert status == 200
    patch = s.next("desiredPatch")["desiredPatch"]
    assert patch["rate"] == 7 and patch["$version"] == twin["properties"]["desired"]["$version"]
    s.finish()
    status, twin = api_status(gateway, "GET", "/twins/node-dev")
    assert twin["properties"]["reported"]["firmware"] == "1.2.3"
    assert "bad name" not in twin["properties"]["reported"], "a refused patch changes nothing"


@pytest.mark.parametrize("transport", ["mqtt", "amqp", "mqttws", "amqpws"])
def test_direct_method_round_trip(gateway, scenario, transport):
    s = scenario("methods", transport=transport)
    s.next("ready")
    # The AMQP transport attaches its links after open() and onDeviceMethod
    # return, and the hub counts an AMQP identity connected from its first
    # link (as edgeHub does): until then it is not connected, then connected
    # but not listening.
    deadline = time.time() + 10
    while True:
        status, r = api_status(gateway, "POST", "/twins/node-dev/methods",
                               {"methodName": "echo", "payload": {"x": 1}, "responseTimeoutInSeconds": 10})
        if status != 404 or time.time() > deadline:
            break
        expected = ("not subscribed",) if transport.startswith("mqtt") else ("not subscribed", "is not connected")
        assert any(e in r["message"] for e in expected), r
        time.sleep(0.1)
    assert status == 200, r
    assert r == {"status": 200, "payload": {"echoed": {"x": 1}}}
    assert s.next("method")["payload"] == {"x": 1}
    s.finish()
    deadline = time.time() + 10
    while api_status(gateway, "GET", "/twins/node-dev")[1]["connectionState"] != "Disconnected":
        assert time.time() < deadline, "the twin never showed the device disconnected"
        time.sleep(0.05)
    # Gone: IoT Hub's 404103 DeviceNotOnline.
    status, r = api_status(gateway, "POST", "/twins/node-dev/methods",
                           {"methodName": "echo", "payload": {}, "responseTimeoutInSeconds": 5})
    assert status == 404 and r["errorCode"] == 404103, r


def test_wrong_key_is_refused_as_unauthorized(gateway, scenario):
    wrong = base64.b64encode(b"not-the-key-of-this-device-000000").decode()
    s = scenario("connect", device_cs(wrong))
    r = s.next("connected")
    assert r["connected"] is False
    assert r["name"] == "UnauthorizedError", r
    assert s.finish() == 0
    assert "not authorized" in gateway.log()
    s = scenario("connect")
    assert s.next("connected")["connected"] is True
    s.finish()
