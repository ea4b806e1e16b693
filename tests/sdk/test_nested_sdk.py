"""A device on the official Azure IoT SDK, connected to a child edgehub that
links to a parent edgehub (IoT Edge's auth-chain scheme: the parent holds no
key of the device). Telemetry goes up with the device's identity; a C2D
message, a desired-property patch and a direct method sent at the parent's
service API come down to the device; its twin is served from the child's
cache while the parent is away, and reported properties made meanwhile reach
the parent when it returns."""

import base64
import json
import queue
import signal
import time

import pytest
from azure.iot.device import MethodResponse, Message

from test_azure_iot_sdk import DEV_KEY, HUB, api_status, device_client, port_free

CHILD_KEY = base64.b64encode(b"child-edge-key-for-sdk-nesting!!").decode()
UNRELATED_KEY = base64.b64encode(b"the-parent-never-has-leaf-keys!!").decode()


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(cond, timeout=20, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(params=["mqtt", "amqp"])
def nested(start_hub, tmp_path, request):
    protocol = request.param
    if not port_free(8883):
        pytest.fail("port 8883 is taken; the Azure SDK can only dial 8883")
    parent_ids = tmp_path / "parent-ids.json"
    parent_ids.write_text(json.dumps({"iothubHostname": HUB, "devices": [
        {"deviceId": "child-edge", "primaryKey": CHILD_KEY, "edge": True, "parent": "parent-edge"},
        {"deviceId": "sdk-dev", "primaryKey": UNRELATED_KEY, "parent": "child-edge"}]}))
    child_ids = tmp_path / "child-ids.json"
    child_ids.write_text(json.dumps({"iothubHostname": HUB, "devices": [
        {"deviceId": "sdk-dev", "primaryKey": DEV_KEY}]}))
    port = free_port()

    # The parent's listener for the child's link; the device's 8883 is the child's.
    listen = {"mqtts" if protocol == "mqtt" else "amqps": f"127.0.0.1:{port}"}

    def parent():
        return start_hub("--identities", str(parent_ids), "--device-id", "parent-edge",
                         name="parent", allow_anonymous=False, **listen)

    p = parent()
    child = start_hub("--identities", str(child_ids),
                      "--connection-string", f"HostName={HUB};DeviceId=child-edge;SharedAccessKey={CHILD_KEY}",
                      "--upstream", f"{protocol}s://localhost:{port}", "--upstream-ca", str(p.ca),
                      "--upstream-auth", "chain",
                      name="child", allow_anonymous=False, mqtts="127.0.0.1:8883")
    return parent, p, child


def call_method(parent, call, timeout=20):
    """Calls until the device is reachable through the child (its upstream
    connection and subscriptions are set up right after it connects)."""
    deadline = time.time() + timeout
    while True:
        status, body = api_status(parent, "POST", "/twins/sdk-dev/methods", call)
        if status != 404 or time.time() > deadline:
            return status, body
        time.sleep(0.2)


def test_cloud_to_device_traffic_reaches_the_device_through_the_child(nested):
    start_parent, parent, child = nested
    client = device_client(child)
    c2d, patches = queue.Queue(), queue.Queue()
    client.on_message_received = c2d.put
    client.on_twin_desired_properties_patch_received = patches.put

    def on_method(req):
        client.send_method_response(MethodResponse.create_from_method_request(
            req, 200, {"method": req.name, "got": req.payload}))

    client.on_method_request_received = on_method
    client.connect()
    try:
        # Up: telemetry with the device's identity and properties.
        m = Message("t1", content_encoding="utf-8", content_type="text/plain")
        m.custom_properties["kind"] = "nested"
        client.send_message(m)
        out = wait_for(lambda: parent.outbox(), what="telemetry at the parent")
        assert base64.b64decode(out[0]["body"]) == b"t1"
        assert out[0]["system_properties"]["connectionDeviceId"] == "sdk-dev"
        assert out[0]["properties"] == {"kind": "nested"}

        # Down: a direct method.
        status, answer = call_method(parent, {"methodName": "reboot", "payload": {"delay": 1},
                                              "responseTimeoutInSeconds": 10})
        assert status == 200, answer
        assert answer == {"status": 200, "payload": {"method": "reboot", "got": {"delay": 1}}}

        # Down: a desired-property patch, with the parent's version.
        status, t = api_status(parent, "PATCH", "/twins/sdk-dev", {"properties": {"desired": {"rate": 5}}})
        assert status == 200
        version = t["properties"]["desired"]["$version"]
        assert patches.get(timeout=10) == {"rate": 5, "$version": version}

        # Down: a C2D message.
        parent.api("POST", "/devices/sdk-dev/messages/deviceBound",
                   {"body": "hello from the cloud", "properties": {"kind": "cmd"}, "messageId": "c-1"})
        got = c2d.get(timeout=10)
        assert got.data == b"hello from the cloud"
        assert got.custom_properties == {"kind": "cmd"} and got.message_id == "c-1"
        # The parent's queue empties only once the child stored it.
        wait_for(lambda: parent.outbox(endpoint="c2d:sdk-dev") == [], what="parent's C2D queue to empty")

        # Up: reported properties reach the parent's twin.
        client.patch_twin_reported_properties({"fw": "2.0"})
        wait_for(lambda: api_status(parent, "GET", "/twins/sdk-dev")[1]["properties"]["reported"].get("fw") == "2.0",
                 what="reported properties at the parent")

        # The parent goes away: the twin comes from the child's cache and
        # reported properties are accepted locally.
        parent.stop(signal.SIGKILL)
        twin = client.get_twin()
        assert twin["desired"]["rate"] == 5 and twin["desired"]["$version"] == version
        client.patch_twin_reported_properties({"fw": "2.1", "offline": True})
        parent = start_parent()
        wait_for(lambda: api_status(parent, "GET", "/twins/sdk-dev")[1]["properties"]["reported"].get("offline"),
                 timeout=60, what="offline reported properties synchronised")
        reported = api_status(parent, "GET", "/twins/sdk-dev")[1]["properties"]["reported"]
        assert reported["fw"] == "2.1"

        # Methods reach the device again once the parent is back.
        status, answer = call_method(parent, {"methodName": "ping", "payload": None,
                                              "responseTimeoutInSeconds": 10}, timeout=60)
        assert status == 200, answer
    finally:
        client.shutdown()

    # The device left the child: the parent no longer sees it (404 at once).
    wait_for(lambda: api_status(parent, "POST", "/twins/sdk-dev/methods",
                                {"methodName": "x", "responseTimeoutInSeconds": 5})[0] == 404,
             what="the identity to leave the parent")
