"""Devices and modules using the official Azure IoT device SDK for Python,
unchanged, pointed at the gateway with GatewayHostName and its CA. The SDK
always dials port 8883, so the hub listens on 127.0.0.1:8883 here."""

import base64
import json
import socket

import pytest
from azure.iot.device import IoTHubDeviceClient, IoTHubModuleClient, Message
from azure.iot.device import exceptions

DEV_KEY = base64.b64encode(b"sdk-device-primary-key-0123456789").decode()
MOD_KEY = base64.b64encode(b"sdk-module-primary-key-0123456789").decode()
HUB = "myhub.azure-devices.net"


def port_free(port):
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


@pytest.fixture
def gateway(start_hub, tmp_path):
    if not port_free(8883):
        pytest.fail("port 8883 is taken; the Azure SDK can only dial 8883")
    ids = tmp_path / "identities.json"
    ids.write_text(json.dumps({
        "iothubHostname": HUB,
        "devices": [{"deviceId": "sdk-dev", "primaryKey": DEV_KEY,
                     "modules": [{"moduleId": "sdk-mod", "primaryKey": MOD_KEY}]}],
    }))
    return start_hub("--identities", str(ids), allow_anonymous=False, mqtts="127.0.0.1:8883")


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
    cs = f"HostName={HUB};DeviceId=sdk-dev;ModuleId=sdk-mod;SharedAccessKey={MOD_KEY};GatewayHostName=localhost"
    client = IoTHubModuleClient.create_from_connection_string(
        cs, server_verification_cert=ca(gateway), connection_retry=False)
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
