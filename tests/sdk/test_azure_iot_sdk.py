"""Devices and modules using the official Azure IoT device SDK for Python,
unchanged, pointed at the gateway with GatewayHostName and its CA. The SDK
always dials port 8883, so the hub listens on 127.0.0.1:8883 here."""

import base64
import json
import queue
import socket
import threading
import time
import urllib.error

import pytest
from conftest import start_sdk_gateway
from azure.iot.device import IoTHubDeviceClient, IoTHubModuleClient, Message
from azure.iot.device import exceptions

DEV_KEY = base64.b64encode(b"sdk-device-primary-key-0123456789").decode()
MOD_KEY = base64.b64encode(b"sdk-module-primary-key-0123456789").decode()
MOD2_KEY = base64.b64encode(b"sdk-module-two-primary-key-012345").decode()
HUB = "myhub.azure-devices.net"


def port_free(port):
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def start_gateway(start_hub, tmp_path, *args):
    return start_sdk_gateway(start_hub, tmp_path, HUB, ("sdk-dev", DEV_KEY),
                             [("sdk-mod", MOD_KEY), ("sdk-mod2", MOD2_KEY)], *args)


@pytest.fixture
def gateway(start_hub, tmp_path):
    return start_gateway(start_hub, tmp_path)


def api_status(hub, method, path, body=None):
    """(HTTP status, JSON body) of a management call, errors included."""
    try:
        return 200, hub.api(method, path, body)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def module_client(gateway, module="sdk-mod", key=MOD_KEY):
    cs = f"HostName={HUB};DeviceId=sdk-dev;ModuleId={module};SharedAccessKey={key};GatewayHostName=localhost"
    return IoTHubModuleClient.create_from_connection_string(
        cs, server_verification_cert=ca(gateway), connection_retry=False)


def ca(hub):
    return hub.ca.read_text()


def device_client(gateway, key=DEV_KEY):
    """The SDK's device client for sdk-dev, pointed at the gateway."""
    cs = f"HostName={HUB};DeviceId=sdk-dev;SharedAccessKey={key};GatewayHostName=localhost"
    return IoTHubDeviceClient.create_from_connection_string(
        cs, server_verification_cert=ca(gateway), connection_retry=False)


def test_device_sends_telemetry_through_the_gateway(gateway):
    client = device_client(gateway)
    client.connect()
    try:
        for i in range(3):
            m = Message(json.dumps({"n": i}), content_encoding="utf-8", content_type="application/json")
            m.custom_properties["kind"] = "test"
            client.send_message(m)  # returns once the gateway's PUBACK arrives
    finally:
        client.shutdown()
    log = gateway.log()
    assert "client connected" in log and "client=sdk-dev" in log
    # Acknowledged means stored: all three wait in the $upstream outbox with
    # the SDK's properties and the identity the gateway authenticated.
    out = gateway.outbox()
    assert [json.loads(base64.b64decode(m["body"])) for m in out] == [{"n": 0}, {"n": 1}, {"n": 2}]
    for m in out:
        assert m["properties"] == {"kind": "test"}
        assert m["system_properties"]["connectionDeviceId"] == "sdk-dev"
        assert m["system_properties"]["contentType"] == "application/json"
        assert m["system_properties"]["contentEncoding"] == "utf-8"


def test_device_receives_cloud_to_device_messages(gateway):
    import queue
    client = device_client(gateway)
    received = queue.Queue()
    client.on_message_received = received.put
    client.connect()
    try:
        gateway.api("POST", "/api/devices/sdk-dev/messages",
                    {"body": "hello device", "properties": {"kind": "cmd"}, "messageId": "m-1"})
        m = received.get(timeout=10)
        assert m.data == b"hello device"
        assert m.custom_properties == {"kind": "cmd"}
        assert m.message_id == "m-1"
    finally:
        client.shutdown()
    # Acknowledged by the SDK's PUBACK: nothing left for this device.
    import time
    deadline = time.time() + 10
    while gateway.outbox(endpoint="c2d:sdk-dev") and time.time() < deadline:
        time.sleep(0.05)
    assert gateway.outbox(endpoint="c2d:sdk-dev") == []


def test_module_sends_to_an_output(gateway):
    client = module_client(gateway)
    client.connect()
    try:
        client.send_message_to_output(Message("reading"), "out1")
    finally:
        client.shutdown()
    # The default route FROM /messages/* takes module outputs too.
    out = gateway.outbox()
    assert [base64.b64decode(m["body"]) for m in out] == [b"reading"]
    sp = out[0]["system_properties"]
    assert sp["connectionDeviceId"] == "sdk-dev" and sp["connectionModuleId"] == "sdk-mod"
    assert sp["outputName"] == "out1"


def test_wrong_key_is_refused(gateway):
    wrong = base64.b64encode(b"not-the-right-key-0123456789abcdef").decode()
    client = device_client(gateway, key=wrong)
    with pytest.raises((exceptions.CredentialError, exceptions.ConnectionFailedError, exceptions.ClientError)):
        client.connect()
    client.shutdown()
    assert "signature does not match" in gateway.log()


def section(t, name):
    """A properties section of a service-side twin without its `$metadata`,
    after checking that IoT Hub's metadata is there."""
    s = dict(t["properties"][name])
    meta = s.pop("$metadata")
    assert meta["$lastUpdated"].endswith("Z")
    return s


def test_device_twin_get_reported_patch_and_desired_updates(start_hub, tmp_path):
    gateway = start_gateway(start_hub, tmp_path)
    client = device_client(gateway)
    patches = queue.Queue()
    client.connect()
    try:
        twin = client.get_twin()
        assert twin == {"desired": {"$version": 1}, "reported": {"$version": 1}}
        client.patch_twin_reported_properties({"fw": "1.2", "net": {"up": True, "ip": "10.0.0.9"}})
        client.patch_twin_reported_properties({"net": {"ip": None}})  # null deletes
        status, t = api_status(gateway, "GET", "/twins/sdk-dev")
        assert status == 200
        assert section(t, "reported") == {"fw": "1.2", "net": {"up": True}, "$version": 3}
        assert t["properties"]["reported"]["$metadata"]["$lastUpdated"] != "0001-01-01T00:00:00Z"
        assert t["connectionState"] == "Connected" and t["etag"] and t["version"] >= 3

        client.on_twin_desired_properties_patch_received = patches.put
        status, t = api_status(gateway, "PATCH", "/twins/sdk-dev",
                               {"tags": {"site": "lab"}, "properties": {"desired": {"rate": 5}}})
        assert status == 200 and t["tags"] == {"site": "lab"}
        assert patches.get(timeout=10) == {"rate": 5, "$version": 2}

        twin = client.get_twin()
        assert twin["desired"] == {"rate": 5, "$version": 2}
        assert twin["reported"]["fw"] == "1.2"
    finally:
        client.shutdown()

    # Bad input from the service side: a clear 400, nothing changed.
    status, err = api_status(gateway, "PATCH", "/twins/sdk-dev", {"properties": {"desired": {"$bad": 1}}})
    assert status == 400 and "start with '$'" in err["error"]
    status, err = api_status(gateway, "GET", "/twins/nobody")
    assert status == 404 and "no device" in err["error"]

    # Twins live in the store: a restart (here kill -9) keeps them.
    import signal
    gateway.stop(signal.SIGKILL)
    gateway = start_gateway(start_hub, tmp_path)
    status, t = api_status(gateway, "GET", "/twins/sdk-dev")
    assert section(t, "desired") == {"rate": 5, "$version": 2}
    assert t["properties"]["reported"]["$version"] == 3
    assert t["tags"] == {"site": "lab"}


def test_module_twin_is_its_own(gateway):
    client = module_client(gateway)
    client.connect()
    try:
        client.patch_twin_reported_properties({"state": "ok"})
        assert client.get_twin()["reported"] == {"state": "ok", "$version": 2}
    finally:
        client.shutdown()
    _, t = api_status(gateway, "GET", "/twins/sdk-dev/modules/sdk-mod")
    assert t["moduleId"] == "sdk-mod" and t["properties"]["reported"]["state"] == "ok"
    _, t = api_status(gateway, "GET", "/twins/sdk-dev")
    assert section(t, "reported") == {"$version": 1}


def test_direct_method_round_trip_offline_and_silent(gateway):
    from azure.iot.device import MethodResponse
    call = {"methodName": "reboot", "payload": {"delay": 3}, "responseTimeoutInSeconds": 10}
    # Not connected: 404 at once.
    status, err = api_status(gateway, "POST", "/twins/sdk-dev/methods", call)
    assert status == 404 and "not connected" in err["error"]

    client = device_client(gateway)
    seen = queue.Queue()

    def on_method(req):
        seen.put((req.name, req.payload))
        if req.name == "reboot":
            client.send_method_response(MethodResponse.create_from_method_request(
                req, 201, {"echo": req.payload, "ok": True}))
        # "hang" is never answered.

    client.connect()
    try:
        # Connected but not subscribed to methods yet: 404 that says so.
        status, err = api_status(gateway, "POST", "/twins/sdk-dev/methods", call)
        assert status == 404 and "subscribed" in err["error"]
        client.on_method_request_received = on_method
        status, answer = api_status(gateway, "POST", "/twins/sdk-dev/methods", call)
        assert status == 200
        assert answer == {"status": 201, "payload": {"echo": {"delay": 3}, "ok": True}}
        assert seen.get(timeout=5) == ("reboot", {"delay": 3})

        status, err = api_status(gateway, "POST", "/twins/sdk-dev/methods",
                                 {"methodName": "hang", "payload": None, "responseTimeoutInSeconds": 5})
        assert status == 504 and "did not answer" in err["error"]
        status, err = api_status(gateway, "POST", "/twins/sdk-dev/methods",
                                 {"methodName": "reboot", "responseTimeoutInSeconds": 1})
        assert status == 400 and "5-300" in err["error"]
    finally:
        client.shutdown()


def test_module_output_reaches_another_modules_input(start_hub, tmp_path):
    routes = tmp_path / "routes.json"
    routes.write_text(json.dumps({"schemaVersion": "1.1", "storeAndForwardConfiguration": {"timeToLiveSecs": 7200}, "routes": {
        "m2m": 'FROM /messages/modules/sdk-mod/outputs/out1 INTO BrokeredEndpoint("/modules/sdk-mod2/inputs/in1")',
        "up": "FROM /messages/* WHERE NOT IS_DEFINED($connectionModuleId) INTO $upstream",
    }}))
    gateway = start_gateway(start_hub, tmp_path, "--routes", str(routes))
    sender = module_client(gateway)
    receiver = module_client(gateway, "sdk-mod2", MOD2_KEY)
    got = queue.Queue()
    receiver.on_message_received = got.put
    receiver.connect()
    sender.connect()
    try:
        for i in range(3):
            m = Message(json.dumps({"i": i}), content_type="application/json", content_encoding="utf-8")
            m.custom_properties["seq"] = str(i)
            sender.send_message_to_output(m, "out1")
        for i in range(3):
            m = got.get(timeout=10)
            assert m.input_name == "in1"
            assert json.loads(m.data) == {"i": i}
            assert m.custom_properties["seq"] == str(i)
    finally:
        sender.shutdown()
        receiver.shutdown()
    assert gateway.outbox() == [], "module traffic did not take the device route"


def test_unknown_device_is_refused(gateway):
    cs = f"HostName={HUB};DeviceId=nobody;SharedAccessKey={DEV_KEY};GatewayHostName=localhost"
    client = IoTHubDeviceClient.create_from_connection_string(
        cs, server_verification_cert=ca(gateway), connection_retry=False)
    with pytest.raises((exceptions.CredentialError, exceptions.ConnectionFailedError, exceptions.ClientError)):
        client.connect()
    client.shutdown()
    assert 'unknown device "nobody"' in gateway.log()


# Expired tokens: this SDK refuses to connect with one (ValueError before it
# dials), so the gateway's refusal is tested with paho in tests/python
# (test_iothub_auth: test_refusals, test_connection_closed_when_its_token_expires).
# Oversized messages: this SDK refuses to send more than 256 KiB itself
# (ValueError), so the gateway's refusal (MQTT 5 DISCONNECT 0x95 with the
# reason) is tested with paho in tests/python/test_iothub_auth.py. A foreign
# device's topic cannot be reached through the SDK either (it builds topics
# from its own identity); see test_publishing_on_another_devices_topic_disconnects.
