"""IoT Hub authentication on the gateway: SAS tokens signed by Python's own
hmac (as the Azure IoT SDKs sign them), MQTT over TLS with the generated CA."""

import base64
import hashlib
import hmac
import json
import time
import urllib.parse

import paho.mqtt.client as mqtt
import pytest

import rawmqtt as raw
from conftest import Client

DEV_KEY = base64.b64encode(b"device-one-primary-key-0123456789").decode()
MOD_KEY = base64.b64encode(b"module-filter-key-0123456789abcd").decode()
GATEWAY = "edgehub-test"  # the harness passes --hostname edgehub-test


def sas(resource, key, ttl=3600):
    expiry = int(time.time()) + ttl
    sr = urllib.parse.quote(resource, safe="")
    sig = base64.b64encode(hmac.new(base64.b64decode(key), f"{sr}\n{expiry}".encode(), hashlib.sha256).digest())
    return f"SharedAccessSignature sr={sr}&sig={urllib.parse.quote(sig, safe='')}&se={expiry}"


@pytest.fixture
def iothub(start_hub, tmp_path):
    ids = tmp_path / "identities.json"
    ids.write_text(json.dumps({
        "iothubHostname": "myhub.azure-devices.net",
        "devices": [
            {"deviceId": "dev1", "primaryKey": DEV_KEY,
             "modules": [{"moduleId": "filter", "primaryKey": MOD_KEY}]},
            {"deviceId": "dev2", "primaryKey": DEV_KEY},
        ],
    }))
    return start_hub("--identities", str(ids), allow_anonymous=False)


def device(hub, client_id, token, username=None, version=3):
    identity = client_id
    c = Client(hub, client_id, version=version, transport="tls",
               username=username or f"{GATEWAY}/{identity}/?api-version=2021-04-12", password=token)
    return c


def test_device_telemetry_and_module_input(iothub):
    dev = device(iothub, "dev1", sas(f"{GATEWAY}/devices/dev1", DEV_KEY))
    dev.connect()
    mod = device(iothub, "dev1/filter", sas(f"{GATEWAY}/devices/dev1/modules/filter", MOD_KEY))
    mod.connect()
    # Telemetry on its own topic is accepted (PUBACK).
    dev.publish("devices/dev1/messages/events/%24.ct=application%2Fjson", b'{"t": 1}', qos=1)
    # A module may subscribe to its own inputs, and publish its outputs.
    assert [r.value for r in mod.subscribe("devices/dev1/modules/filter/#", 1)] == [1]
    mod.publish("devices/dev1/modules/filter/messages/events/%24.on=out1", b"x", qos=1)
    # …but not to another module's or device's topics.
    assert [r.value for r in mod.subscribe("devices/dev2/messages/devicebound/#", 1)] == [0x80]
    dev.disconnect()
    mod.disconnect()


def test_token_signed_for_the_iothub_hostname_and_the_device_key_for_a_module(iothub):
    c = device(iothub, "dev1", sas("myhub.azure-devices.net/devices/dev1", DEV_KEY),
               username="myhub.azure-devices.net/dev1/?api-version=2021-04-12&DeviceClientType=py")
    c.connect()
    c.disconnect()
    m = device(iothub, "dev1/filter", sas(f"{GATEWAY}/devices/dev1/modules/filter", DEV_KEY))
    m.connect()
    m.disconnect()


def test_publishing_on_another_devices_topic_disconnects(iothub):
    dev = device(iothub, "dev1", sas(f"{GATEWAY}/devices/dev1", DEV_KEY))
    dev.connect()
    dev.c.publish("devices/dev2/messages/events/", b"spoofed", 1)
    dev.disconnects.get(timeout=5)  # MQTT 3.1.1 has no negative PUBACK: closed
    assert "not authorized to publish" in iothub.log()


# Every refusal is return code 5 "not authorized", as IoT Hub answers; the
# log says which check failed.
@pytest.mark.parametrize("case,why", [
    ("wrong key", "signature does not match"),
    ("expired", "token expired"),
    ("username for another device", "does not match client id"),
    ("unknown device", "unknown device"),
    ("no credentials", "connection refused"),
])
def test_refusals(iothub, case, why):
    good = sas(f"{GATEWAY}/devices/dev1", DEV_KEY)
    client_id, user, password = "dev1", f"{GATEWAY}/dev1/?api-version=x", good
    if case == "wrong key":
        password = sas(f"{GATEWAY}/devices/dev1", MOD_KEY)
    elif case == "expired":
        password = sas(f"{GATEWAY}/devices/dev1", DEV_KEY, ttl=-600)
    elif case == "username for another device":
        user = f"{GATEWAY}/dev2/?api-version=x"
    elif case == "unknown device":
        client_id, user = "ghost", f"{GATEWAY}/ghost/?api-version=x"
        password = sas(f"{GATEWAY}/devices/ghost", DEV_KEY)
    sock = raw.open_conn(iothub.port("tcp"))
    if case == "no credentials":
        sock.sendall(raw.connect(client_id, version=4))
    else:
        sock.sendall(raw.connect(client_id, version=4, username=user, password=password))
    assert raw.read_packet(sock) == (0x20, bytes([0, 5]))
    log = iothub.log()
    assert "connection refused" in log and why in log
    assert "sig=" not in log, "the token never reaches the log"


def test_connection_closed_when_its_token_expires(iothub):
    # Expired 297 s ago: still inside the 5-minute skew for about 3 seconds.
    c = device(iothub, "dev1", sas(f"{GATEWAY}/devices/dev1", DEV_KEY, ttl=-297), version=5)
    c.connect()
    started = time.time()
    rc, _ = c.disconnects.get(timeout=15)
    assert rc.value == 0x87  # Not authorized
    assert time.time() - started >= 1.5
    assert "SAS token expired" in iothub.log()
    c.c.loop_stop()


def test_twin_replies_reach_only_the_asking_device(iothub):
    """`$iothub/twin/res/#` is the same filter for every device: a reply must
    go to the device that asked, never to another one listening there."""
    a = device(iothub, "dev1", sas(f"{GATEWAY}/devices/dev1", DEV_KEY), version=5)
    b = device(iothub, "dev2", sas(f"{GATEWAY}/devices/dev2", DEV_KEY), version=5)
    a.connect()
    b.connect()
    for c in (a, b):
        assert [r.value for r in c.subscribe("$iothub/twin/res/#", 1)] == [1]
    a.publish("$iothub/twin/GET/?$rid=7", b"", qos=1)
    m = a.get()
    assert m.topic == "$iothub/twin/res/200/?$rid=7"
    assert json.loads(m.payload) == {"desired": {"$version": 1}, "reported": {"$version": 1}}
    a.publish("$iothub/twin/PATCH/properties/reported/?$rid=8", b'{"temp": 21}', qos=1)
    assert a.get().topic == "$iothub/twin/res/204/?$rid=8&$version=2"
    # Bad patches get 400 with a reason, and change nothing.
    a.publish("$iothub/twin/PATCH/properties/reported/?$rid=9", b"not json", qos=1)
    m = a.get()
    assert m.topic == "$iothub/twin/res/400/?$rid=9" and "JSON" in json.loads(m.payload)["message"]
    a.publish("$iothub/twin/GET/?$rid=10", b"", qos=1)
    assert json.loads(a.get().payload)["reported"] == {"temp": 21, "$version": 2}
    b.assert_no_message()
    # dev2's twin is its own.
    b.publish("$iothub/twin/GET/?$rid=1", b"", qos=1)
    assert json.loads(b.get().payload)["reported"] == {"$version": 1}
    a.assert_no_message()
    # Nobody may publish replies, or push desired properties, themselves.
    a.publish("$iothub/twin/res/200/?$rid=1", b"{}", qos=1)
    b.assert_no_message()
    assert "publish not authorized" in iothub.log()
    a.disconnect()
    b.disconnect()


def test_oversized_telemetry_is_refused_with_a_reason(iothub):
    dev = device(iothub, "dev1", sas(f"{GATEWAY}/devices/dev1", DEV_KEY), version=5)
    dev.connect()
    dev.c.publish("devices/dev1/messages/events/", b"x" * (256 * 1024 + 1), 1)
    rc, props = dev.disconnects.get(timeout=5)
    assert rc.value == 0x95  # Packet too large
    assert "exceeds the maximum" in props.ReasonString
    dev.c.loop_stop()
    assert iothub.outbox() == []


def test_will_is_sent_as_telemetry_and_retain_becomes_a_property(iothub):
    import base64
    c = Client(iothub, "dev1", version=3, transport="tls",
               username=f"{GATEWAY}/dev1/?api-version=2021-04-12",
               password=sas(f"{GATEWAY}/devices/dev1", DEV_KEY),
               will={"topic": "devices/dev1/messages/events/state=lost", "payload": b"gone", "qos": 1})
    c.connect()
    c.publish("devices/dev1/messages/events/", b"sticky", qos=1, retain=True)
    c.kill()  # no DISCONNECT: the will goes out
    deadline = time.time() + 10
    while len(iothub.outbox()) < 2 and time.time() < deadline:
        time.sleep(0.05)
    out = iothub.outbox()
    assert [base64.b64decode(m["body"]) for m in out] == [b"sticky", b"gone"]
    assert out[0]["properties"] == {"mqtt-retain": "true"}
    assert out[1]["properties"] == {"state": "lost", "iothub-MessageType": "Will"}
    assert out[1]["system_properties"]["connectionDeviceId"] == "dev1"
