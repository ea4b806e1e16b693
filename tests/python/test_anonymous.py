"""Anonymous clients (--allow-anonymous) beside registered IoT Hub identities:
an identity's client id, session and topics belong to it alone, whatever
filter form reaches them. Over MQTT 3.1.1 and 5."""

import json

import pytest

import rawmqtt as raw
from conftest import Client
from test_iothub_auth import DEV_KEY, GATEWAY, MOD_KEY, sas


@pytest.fixture
def mixed(start_hub, tmp_path):
    ids = tmp_path / "identities.json"
    ids.write_text(json.dumps({"devices": [
        {"deviceId": "dev1", "primaryKey": DEV_KEY, "modules": [{"moduleId": "filter", "primaryKey": MOD_KEY}]},
    ]}))
    return start_hub("--identities", str(ids), allow_anonymous=True)


def device(hub, version):
    c = Client(hub, "dev1", version=version, username=f"{GATEWAY}/dev1/?api-version=2021-04-12",
               password=sas(f"{GATEWAY}/devices/dev1", DEV_KEY))
    c.connect()
    assert [r.value for r in c.subscribe("devices/dev1/messages/devicebound/#", 1)] == [1]
    return c


@pytest.mark.parametrize("version", [4, 5])
def test_shared_subscriptions_do_not_reach_identities_topics(mixed, version):
    dev = device(mixed, version)
    anon = Client(mixed, "watcher", version=version)
    anon.connect()
    refused = 0x87 if version == 5 else 0x80
    for f in ["$share/g/devices/dev1/messages/devicebound/#", "$share/g/#", "$share/g/$iothub/#",
              "$share/g/+/dev1/messages/devicebound/#", "$share/g/devices/+/messages/devicebound/#"]:
        assert [r.value for r in anon.subscribe(f, 1)] == [refused], f
    # Generic topics may still be shared.
    assert [r.value for r in anon.subscribe("$share/g/plant/#", 1)] == [1]
    mixed.api("POST", "/api/devices/dev1/messages", {"body": "for dev1 only"})
    assert dev.get(timeout=10).payload == b"for dev1 only"
    anon.assert_no_message(wait=1)
    dev.disconnect()
    anon.disconnect()


@pytest.mark.parametrize("version", [4, 5])
@pytest.mark.parametrize("client_id", ["dev1", "DEV1", "dev1/filter"])
def test_anonymous_client_cannot_take_an_identitys_client_id(mixed, version, client_id):
    dev = device(mixed, version)
    impostor = Client(mixed, client_id, version=version, clean=False)
    rc, _, _ = impostor.connect(expect_success=False)
    assert rc.value == 0x87  # paho reports 3.1.1's return code 5 as 0x87 too
    impostor.c.loop_stop()
    assert "belongs to a registered identity" in mixed.log()
    # The device was not taken over and still gets its messages.
    assert dev.disconnects.empty()
    mixed.api("POST", "/api/devices/dev1/messages", {"body": "still mine"})
    assert dev.get(timeout=10).payload == b"still mine"
    dev.disconnect()


def test_publish_with_a_subscription_identifier_is_a_protocol_error(hub):
    sock = raw.open_conn(hub.port("tcp"))
    sock.sendall(raw.connect("subid", version=5))
    first, _ = raw.read_packet(sock)
    assert first == 0x20
    props = bytes([0x0B]) + raw.varint(7)  # Subscription Identifier 7
    body = raw.s("plant/line1") + raw.varint(len(props)) + props + b"x"
    sock.sendall(raw.packet(0x30, body))
    first, body = raw.read_packet(sock)
    assert first == 0xE0 and body[0] == 0x82, "DISCONNECT with Protocol Error"
    assert raw.closed(sock)
    assert "must not carry a Subscription Identifier" in hub.log()
