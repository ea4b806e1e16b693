"""MQTT over QUIC (UDP, ALPN `mqtt`) against the real binary with aioquic, an
independent QUIC implementation: connect, publish, subscribe, QoS 1 and 2,
IoT Hub SAS authentication, and input the hub must refuse without
disturbing anyone."""

import asyncio
import base64
import json
import socket

import pytest

import rawmqtt as raw
from conftest import Client
from quicmqtt import QuicMqtt
from test_iothub_auth import DEV_KEY, GATEWAY, sas


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def subscribe(topic, qos, pid=1):
    return raw.packet(0x82, pid.to_bytes(2, "big") + raw.s(topic) + bytes([qos]))


def publish(topic, payload, qos, pid=None):
    body = raw.s(topic) + (pid.to_bytes(2, "big") if qos else b"") + payload
    return raw.packet(0x30 | (qos << 1), body)


def test_connect_subscribe_and_publish_at_qos_1_and_2_reach_a_tcp_client(hub):
    tcp = Client(hub, "tcp-side", version=5, transport="tls")
    tcp.connect()
    tcp.subscribe("quic/out/#", qos=2)

    async def go():
        q = await QuicMqtt.open(hub.ports["quic"], hub.ca)
        q.send(raw.connect("quic-client", version=4))
        assert await q.read_packet() == (0x20, b"\x00\x00")
        q.send(subscribe("quic/in/#", 1))
        assert await q.read_packet() == (0x90, b"\x00\x01\x01")
        # QoS 1 out: PUBACK.
        q.send(publish("quic/out/one", b"first", 1, pid=7))
        assert await q.read_packet() == (0x40, b"\x00\x07")
        # QoS 2 out: PUBREC, PUBREL, PUBCOMP.
        q.send(publish("quic/out/two", b"second", 2, pid=8))
        assert await q.read_packet() == (0x50, b"\x00\x08")
        q.send(raw.packet(0x62, b"\x00\x08"))
        assert await q.read_packet() == (0x70, b"\x00\x08")
        # In from TCP, at the subscription's QoS 1.
        await asyncio.get_running_loop().run_in_executor(
            None, lambda: tcp.publish("quic/in/x", b"to quic", qos=1))
        first, body = await q.read_packet()
        assert first >> 4 == 3 and (first >> 1) & 3 == 1, hex(first)
        assert body.startswith(raw.s("quic/in/x")) and body.endswith(b"to quic")
        q.send(raw.packet(0x40, body[len(raw.s("quic/in/x")):][:2]))
        q.send(raw.packet(0xE0, b""))
        await q.close()

    run(go())
    got = tcp.drain(2)
    assert [(m.topic, m.payload, m.qos) for m in got] == [
        ("quic/out/one", b"first", 1), ("quic/out/two", b"second", 2)]
    tcp.disconnect()


@pytest.fixture
def iothub(start_hub, tmp_path):
    ids = tmp_path / "identities.json"
    ids.write_text(json.dumps({"iothubHostname": "myhub.azure-devices.net",
                               "devices": [{"deviceId": "dev1", "primaryKey": DEV_KEY}]}))
    return start_hub("--identities", str(ids), allow_anonymous=False)


def test_iothub_sas_authentication_applies_as_over_tcp(iothub):
    user = f"{GATEWAY}/dev1/?api-version=2021-04-12"

    async def go():
        q = await QuicMqtt.open(iothub.ports["quic"], iothub.ca)
        q.send(raw.connect("dev1", version=4, username=user, password=sas(f"{GATEWAY}/devices/dev1", DEV_KEY)))
        assert await q.read_packet() == (0x20, b"\x00\x00")
        q.send(publish("devices/dev1/messages/events/kind=quic", b"21.5", 1, pid=1))
        assert await q.read_packet() == (0x40, b"\x00\x01")
        # Another device's topic: the connection goes, as over TCP.
        q.send(publish("devices/dev2/messages/events/", b"forged", 1, pid=2))
        assert await q.read_packet() is None
        await q.close()

        bad = await QuicMqtt.open(iothub.ports["quic"], iothub.ca)
        bad.send(raw.connect("dev1", version=4, username=user,
                             password=sas(f"{GATEWAY}/devices/dev1", base64.b64encode(b"x" * 32).decode())))
        assert await bad.read_packet() == (0x20, b"\x00\x05")  # not authorized
        assert await bad.read_packet() is None
        await bad.close()

        anon = await QuicMqtt.open(iothub.ports["quic"], iothub.ca)
        anon.send(raw.connect("anon", version=4))
        assert await anon.read_packet() == (0x20, b"\x00\x05")
        await anon.close()

    run(go())
    out = iothub.outbox()
    assert [base64.b64decode(m["body"]) for m in out] == [b"21.5"]
    assert out[0]["system_properties"]["connectionDeviceId"] == "dev1"
    assert out[0]["properties"] == {"kind": "quic"}


def test_garbage_datagrams_a_wrong_alpn_and_packets_before_connect_disturb_no_one(hub):
    async def go():
        good = await QuicMqtt.open(hub.ports["quic"], hub.ca)
        good.send(raw.connect("steady", version=4))
        assert await good.read_packet() == (0x20, b"\x00\x00")
        good.send(subscribe("steady/#", 0))
        assert (await good.read_packet())[0] == 0x90

        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            for junk in (b"", b"\x00", b"\xc0" + b"\xff" * 1200, bytes(range(256)) * 5):
                udp.sendto(junk, ("127.0.0.1", hub.ports["quic"]))

        # Refused in the handshake (TLS no_application_protocol).
        with pytest.raises(ConnectionError):
            await QuicMqtt.open(hub.ports["quic"], hub.ca, alpn="h3")

        early = await QuicMqtt.open(hub.ports["quic"], hub.ca)
        early.send(publish("steady/x", b"before connect", 0))
        assert await early.read_packet() is None
        await early.close()

        other = await QuicMqtt.open(hub.ports["quic"], hub.ca)
        other.send(raw.connect("other", version=4))
        assert await other.read_packet() == (0x20, b"\x00\x00")
        other.send(publish("steady/y", b"still fine", 0))
        first, body = await good.read_packet()
        assert first >> 4 == 3 and body.endswith(b"still fine")
        await other.close()
        await good.close()

    run(go())
    assert "before connect" not in hub.log()
