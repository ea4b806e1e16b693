"""Nested edge with IoT Edge's auth-chain scheme: the child connects to the
parent for each downstream identity with `auth-chain=leaf;child;parent` (over
MQTT in the username, over AMQP as a link property) and a token signed with
the child edge's own key. The parent holds no leaf keys: it
accepts a leaf only when its registry has the leaf under the child."""

import base64
import json
import time
import urllib.error

import pytest

from test_iothub_auth import DEV_KEY
from test_store import wait_for
from test_upstream import HUB, by_device, free_port, send

CHILD_KEY = base64.b64encode(b"child-edge-key-0123456789abcdef!").decode()
# What the parent has for the leaves: not their real keys (it never needs them).
UNRELATED_KEY = base64.b64encode(b"parent-does-not-know-leaf-keys!!").decode()


@pytest.fixture(params=["mqtt", "amqp"])
def nested(start_hub, tmp_path, request):
    protocol = request.param
    parent_ids = tmp_path / "parent-identities.json"
    parent_ids.write_text(json.dumps({"iothubHostname": HUB, "devices": [
        {"deviceId": "child-edge", "primaryKey": CHILD_KEY, "edge": True, "parent": "parent-edge"},
        {"deviceId": "other-edge", "primaryKey": UNRELATED_KEY, "edge": True, "parent": "parent-edge"},
        {"deviceId": "leaf1", "primaryKey": UNRELATED_KEY, "parent": "child-edge"},
        {"deviceId": "leaf2", "primaryKey": UNRELATED_KEY, "parent": "other-edge"}]}))
    child_ids = tmp_path / "child-identities.json"
    child_ids.write_text(json.dumps({"iothubHostname": HUB, "devices": [
        {"deviceId": "leaf1", "primaryKey": DEV_KEY},
        {"deviceId": "leaf2", "primaryKey": DEV_KEY},
        {"deviceId": "leaf3", "primaryKey": DEV_KEY}]}))
    port = free_port()
    listen = {"mqtts" if protocol == "mqtt" else "amqps": f"127.0.0.1:{port}"}
    parent = start_hub("--identities", str(parent_ids), "--device-id", "parent-edge",
                       name="parent", allow_anonymous=False, **listen)
    child = start_hub("--identities", str(child_ids),
                      "--connection-string",
                      f"HostName={HUB};DeviceId=child-edge;SharedAccessKey={CHILD_KEY}",
                      "--upstream", f"{protocol}s://localhost:{port}",
                      "--upstream-ca", str(tmp_path / "parent" / "ca.pem"),
                      "--upstream-auth", "chain", "--parent-device-id", "parent-edge",
                      name="child", allow_anonymous=False)
    return parent, child


def test_parent_accepts_only_leaves_registered_under_the_child(nested):
    parent, child = nested
    send(child, "leaf1", 5)
    wait_for(lambda: len(parent.outbox()) == 5, what="leaf1's messages at the parent")
    assert by_device(parent.outbox()) == {"leaf1": [f"leaf1-{i}" for i in range(5)]}

    # leaf2 is registered at the parent under another edge device: refused,
    # kept by the child, and leaf1 keeps flowing meanwhile.
    send(child, "leaf2", 3)
    wait_for(lambda: "not registered under" in parent.log(), what="the parent's refusal")
    send(child, "leaf1", 2, start=5)
    wait_for(lambda: len(parent.outbox()) == 7, what="leaf1 unaffected by leaf2's refusal")
    assert "leaf2" not in by_device(parent.outbox())
    assert "the parent refused this identity" in child.log()
    # The child drops leaf1's messages once the parent's acknowledgement is
    # back, a moment after the parent stored them.
    def left():
        return [m["system_properties"]["connectionDeviceId"] for m in child.outbox()]
    wait_for(lambda: left() == ["leaf2"] * 3, what="only leaf2's messages left at the child")
    assert left() == ["leaf2"] * 3

    # leaf3 is registered at the parent through IoT Hub's registry shape
    # (deviceScope of the child edge) while its messages wait at the child.
    send(child, "leaf3", 2)
    time.sleep(0.5)
    parent.api("PUT", "/devices/leaf3", {
        "deviceId": "leaf3", "authentication": {"type": "sas"},
        "deviceScope": "ms-azure-iot-edge://child-edge-637000000000000000"})
    got = parent.api("GET", "/devices/leaf3")
    assert got["deviceScope"] == "ms-azure-iot-edge://child-edge"
    assert parent.api("GET", "/devices/child-edge")["capabilities"] == {"iotEdge": True}
    # An edge device registered through the API gets its system modules.
    parent.api("PUT", "/devices/edge-b", {"capabilities": {"iotEdge": True},
                                          "parentScopes": ["ms-azure-iot-edge://parent-edge"]})
    mods = {m["moduleId"] for m in parent.api("GET", "/devices/edge-b/modules")}
    assert mods == {"$edgeAgent", "$edgeHub"}
    assert parent.api("GET", "/devices/edge-b")["parentScopes"] == ["ms-azure-iot-edge://parent-edge"]
    # Refused identities retry every 30 s; the parent log shows the retry.
    wait_for(lambda: "leaf3" in by_device(parent.outbox()), timeout=45,
             what="leaf3 accepted once registered under the child")
    assert by_device(parent.outbox())["leaf3"] == ["leaf3-0", "leaf3-1"]


def test_scope_that_names_no_edge_device_is_refused(nested):
    parent, _ = nested
    with pytest.raises(urllib.error.HTTPError) as e:
        parent.api("PUT", "/devices/leafx", {"deviceScope": "ms-azure-iot-edge://leaf1"})
    assert e.value.code == 400
    assert "not an edge device" in e.value.read().decode()


def test_chain_mode_needs_the_edge_device_key(start_hub, tmp_path):
    with pytest.raises(RuntimeError) as e:
        start_hub("--upstream", "mqtts://localhost:1", "--upstream-auth", "chain",
                  "--device-id", "e1", name="bad")
    assert "--connection-string" in str(e.value)
