"""The official Azure IoT device SDK for Node.js over its AMQP transport
(azure-iot-device-amqp, pinned in package-lock.json), unchanged, against the
hub's AMQPS listener: SASL ANONYMOUS then a CBS put-token with the device's
SAS token, telemetry links, cloud-to-device settlement and module inputs. The
SDK dials port 5671, so the hub listens on 127.0.0.1:5671 here. Twins and
direct methods over AMQP run in test_node_sdk.py, beside the same tests over
MQTT."""

import base64
import json
import time

import pytest

from test_node_sdk import (  # noqa: F401 (gateway and scenario are fixtures)
    DEV_KEY, MOD2_KEY, MOD_KEY, Scenario, device_cs, gateway, module_cs, scenario, start_gateway,
)


@pytest.fixture
def amqp(scenario):
    """test_node_sdk's scenarios, over the AMQP transport."""
    return lambda name, cs=None, **env: scenario(name, cs, transport="amqp", **env)


def comparable(record):
    """An outbox record without what differs between two sends by design."""
    sp = dict(record["system_properties"])
    for k in ("enqueuedTime", "edgeMessageId", "messageId"):
        sp.pop(k, None)
    return {"body": record["body"], "properties": record["properties"], "system_properties": sp}


def test_telemetry_is_stored_as_sent_and_as_the_same_message_over_mqtt(gateway, amqp):
    s = amqp("telemetry")
    for _ in range(3):
        s.next("sent")
    assert s.finish() == 0
    out = gateway.outbox()
    assert [json.loads(base64.b64decode(m["body"])) for m in out] == [{"n": 0}, {"n": 1}, {"n": 2}]
    for i, m in enumerate(out):
        assert m["properties"] == {"kind": "test"}
        sp = m["system_properties"]
        assert sp["connectionDeviceId"] == "node-dev"
        assert sp["contentType"] == "application/json"
        assert sp["contentEncoding"] == "utf-8"
        assert sp["messageId"] == f"node-{i}"
    # The same scenario over MQTT: the same records, ids and times aside.
    gateway.ack_outbox(out)
    m = Scenario(gateway, "telemetry", device_cs(), transport="mqtt")
    for _ in range(3):
        m.next("sent")
    assert m.finish() == 0
    over_mqtt = gateway.outbox()
    assert [comparable(r) for r in over_mqtt] == [comparable(r) for r in out]


def wait_until(cond, what, timeout=10):
    deadline = time.time() + timeout
    while not cond():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def c2d_outcome(gateway, outcome):
    return gateway.metrics().get(f'edgehub_c2d_messages_total{{outcome="{outcome}"}}', 0)


def send_c2d(gateway, body, mid):
    gateway.api("POST", "/api/devices/node-dev/messages",
                {"body": body, "properties": {"kind": "cmd"}, "messageId": mid})


def test_cloud_to_device_complete(gateway, amqp):
    s = amqp("c2d")
    s.next("ready")
    send_c2d(gateway, "hello amqp", "c2d-1")
    m = s.next("c2d")
    assert (m["c2d"], m["messageId"], m["properties"].get("kind")) == ("hello amqp", "c2d-1", "cmd")
    wait_until(lambda: gateway.outbox(endpoint="c2d:node-dev") == [], "the message to be completed")
    assert c2d_outcome(gateway, "completed") == 1
    s.finish()


def test_cloud_to_device_reject_removes_and_counts(gateway, amqp):
    s = amqp("c2d", EDGEHUB_SETTLE="reject")
    s.next("ready")
    send_c2d(gateway, "unwanted", "c2d-r")
    assert s.next("c2d")["c2d"] == "unwanted"
    wait_until(lambda: gateway.outbox(endpoint="c2d:node-dev") == [], "the rejected message to leave")
    assert c2d_outcome(gateway, "rejected") == 1
    assert c2d_outcome(gateway, "completed") == 0
    s.finish()


def test_cloud_to_device_abandon_comes_again_with_a_higher_count(gateway, amqp):
    s = amqp("c2d", EDGEHUB_SETTLE="abandon")
    s.next("ready")
    send_c2d(gateway, "again", "c2d-a")
    assert s.next("c2d")["c2d"] == "again"
    second = s.next("c2d")
    assert second["c2d"] == "again", "abandoned: offered again"
    wait_until(lambda: gateway.outbox(endpoint="c2d:node-dev") == [], "the redelivery to be completed")
    assert c2d_outcome(gateway, "completed") == 1
    s.finish()


def test_module_output_reaches_another_modules_input_over_amqp(start_hub, tmp_path):
    routes = tmp_path / "routes.json"
    routes.write_text(json.dumps({
        "schemaVersion": "1.1", "storeAndForwardConfiguration": {"timeToLiveSecs": 7200},
        "routes": {"m2m": 'FROM /messages/modules/node-mod/outputs/out1 '
                          'INTO BrokeredEndpoint("/modules/node-mod2/inputs/in1")'}}))
    gateway = start_gateway(start_hub, tmp_path, "--routes", str(routes))
    receiver = Scenario(gateway, "input", module_cs("node-mod2", MOD2_KEY), transport="amqp")
    sender = None
    try:
        receiver.next("ready")
        sender = Scenario(gateway, "output", module_cs("node-mod", MOD_KEY), transport="amqp")
        sender.next("sent")
        assert sender.finish() == 0
        got = receiver.next("input")
        assert got["input"] == "in1"
        assert json.loads(got["body"]) == {"temp": 42}
        assert got["properties"]["unit"] == "C"
    finally:
        receiver.finish()
        if sender and sender.proc.poll() is None:
            sender.proc.kill()
    endpoint = 'BrokeredEndpoint("/modules/node-mod2/inputs/in1")'
    wait_until(lambda: gateway.outbox(endpoint=endpoint) == [], "the input to be completed")


@pytest.mark.parametrize("cs", [
    device_cs(base64.b64encode(b"not-the-device-key-0123456789abc").decode()),
    "HostName=myhub.azure-devices.net;DeviceId=nobody;SharedAccessKey="
    + DEV_KEY + ";GatewayHostName=localhost",
], ids=["wrong-key", "unknown-device"])
def test_bad_credentials_are_refused(gateway, amqp, cs):
    s = amqp("connect", cs=cs)
    got = s.next("connected", timeout=30)
    assert got["connected"] is False, got
    assert s.finish() == 0
    assert gateway.outbox() == []


def test_an_amqp_connection_takes_over_the_same_identitys_mqtt_connection(gateway, amqp):
    over_mqtt = Scenario(gateway, "c2d", device_cs(), transport="mqtt")
    try:
        over_mqtt.next("ready")
        over_amqp = amqp("c2d")
        over_amqp.next("ready")
        send_c2d(gateway, "to the newest link", "c2d-t")
        assert over_amqp.next("c2d")["c2d"] == "to the newest link"
    finally:
        over_mqtt.finish()
