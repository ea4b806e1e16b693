"""MQTT over WebSocket (the `mqtt` subprotocol on the hub's wss and ws
listeners) with paho's websocket transport, MQTT 3.1.1 and 5.0, and with a
hand-built WebSocket client for what paho cannot do: a byte stream cut at
every byte, fragmented messages, pings, refusals."""

import base64
import socket
import ssl

import pytest

import certs
import rawmqtt
import rawws
from conftest import Client
from test_x509 import pki  # noqa: F401 (fixture)

GATEWAY = "edgehub-test"


@pytest.fixture
def wshub(start_hub):
    return start_hub("--ws-listen", "127.0.0.1:0")


@pytest.mark.parametrize("version", [4, 5])
@pytest.mark.parametrize("transport", ["wss", "ws"])
def test_paho_over_websocket_publishes_and_receives_across_transports(wshub, transport, version):
    ws = Client(wshub, "ws-client", version=version, transport=transport)
    tcp = Client(wshub, "tcp-client", version=version, transport="tls")
    ws.connect()
    tcp.connect()
    ws.subscribe("plant/+/temp", qos=1)
    tcp.subscribe("plant/ws/#", qos=1)
    tcp.publish("plant/tcp/temp", b"21.5", qos=1)
    m = ws.get()
    assert (m.topic, m.payload, m.qos) == ("plant/tcp/temp", b"21.5", 1)
    big = bytes(range(256)) * 400  # 100 KiB: more than one WebSocket frame for most stacks
    ws.publish("plant/ws/blob", big, qos=1)
    m = tcp.get()
    assert (m.topic, m.payload) == ("plant/ws/blob", big)
    ws.disconnect()
    tcp.disconnect()


def raw_connect(port, ca=None, protocol="mqtt"):
    return rawws.RawWs(port, protocol=protocol, ca=ca)


def test_a_stream_cut_at_every_byte_and_fragmented_messages_still_parse(wshub):
    w = raw_connect(wshub.ports["wss"], ca=wshub.ca)
    connect = rawmqtt.connect("cut", version=4)
    # One byte per message, a ping in the middle.
    for i, b in enumerate(connect):
        w.send(bytes([b]))
        if i == 3:
            w.send_frame(rawws.PING, b"still there?")
    control = []
    first, body = w.read_packet(control)
    assert first == 0x20 and body == b"\x00\x00", (first, body)
    assert (rawws.PONG, b"still there?") in control
    # SUBSCRIBE and PUBLISH in one message, cut mid-packet into three
    # fragments (a text-less continuation sequence).
    sub = rawmqtt.packet(0x82, b"\x00\x01" + rawmqtt.s("cut/#") + b"\x01")
    pub = rawmqtt.packet(0x32, rawmqtt.s("cut/a") + b"\x00\x02" + b"payload")
    stream = sub + pub
    w.send_frame(rawws.BINARY, stream[:3], fin=False)
    w.send_frame(rawws.CONTINUATION, stream[3:len(sub) + 2], fin=False)
    w.send_frame(rawws.CONTINUATION, stream[len(sub) + 2:], fin=True)
    got = [w.read_packet() for _ in range(3)]
    kinds = sorted(p[0] >> 4 for p in got)
    assert kinds == [3, 4, 9], got  # the message to ourselves, PUBACK, SUBACK
    delivered = next(p for p in got if p[0] >> 4 == 3)
    assert delivered[1].endswith(b"payload")
    w.close()


def test_refusals_say_why_and_disturb_no_one(wshub):
    bystander = Client(wshub, "bystander", version=5, transport="wss")
    bystander.connect()
    bystander.subscribe("still/#", qos=1)

    with pytest.raises(rawws.Refused) as e:
        raw_connect(wshub.ports["wss"], ca=wshub.ca, protocol="amqp")
    assert e.value.status == 400
    assert "no supported subprotocol offered" in e.value.body and "AMQPWSB10" in e.value.body
    with pytest.raises(rawws.Refused) as e:
        raw_connect(wshub.ports["ws"], protocol=None)
    assert e.value.status == 400

    # Not HTTP at all: an MQTT CONNECT straight to the WebSocket port, over
    # TLS and in the clear; then TLS garbage.
    for port, tls in ((wshub.ports["wss"], True), (wshub.ports["ws"], False)):
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        if tls:
            sock = ssl.create_default_context(cafile=str(wshub.ca)).wrap_socket(
                sock, server_hostname="localhost")
        sock.sendall(rawmqtt.connect("sneaky"))
        assert rawmqtt.closed(sock)
    sock = socket.create_connection(("127.0.0.1", wshub.ports["wss"]), timeout=5)
    sock.sendall(b"\x16\x03\x01\x00\x05hello" * 10)
    assert rawmqtt.closed(sock)

    # A text message is not MQTT: the connection goes.
    w = raw_connect(wshub.ports["ws"])
    w.send_frame(rawws.TEXT, rawmqtt.connect("texty"))
    try:
        assert w.read_packet() is None, "no CONNACK for a text message"  # a Close frame
    except ConnectionError:
        pass
    assert rawmqtt.closed(w.sock)

    publisher = Client(wshub, "publisher", version=5, transport="wss")
    publisher.connect()
    publisher.publish("still/here", b"yes", qos=1)
    assert bystander.get().payload == b"yes"
    publisher.disconnect()
    bystander.disconnect()


def test_a_device_certificate_over_wss_authenticates_it(start_hub, pki):  # noqa: F811
    hub = start_hub(allow_anonymous=False)
    cert, key = certs.make_cert("ws-thermo")
    files = certs.write(pki["dir"], "ws-thermo", cert, key)
    hub.api("PUT", "/devices/ws-thermo", {"authentication": {
        "type": "selfSigned", "x509Thumbprint": {"primaryThumbprint": certs.thumbprint(cert)}}})
    ctx = ssl.create_default_context(cafile=str(hub.ca))
    ctx.load_cert_chain(str(files[0]), str(files[1]))
    c = Client(hub, "ws-thermo", version=4, transport="wss", tls_context=ctx,
               username=f"{GATEWAY}/ws-thermo/?api-version=2021-04-12")
    c.connect()
    c.publish("devices/ws-thermo/messages/events/", b"22.0", qos=1)
    c.disconnect()
    out = hub.outbox()
    assert [base64.b64decode(m["body"]) for m in out] == [b"22.0"]
    assert out[0]["system_properties"]["connectionDeviceId"] == "ws-thermo"
    # Without the certificate (and without a token) the same device is refused.
    c = Client(hub, "ws-thermo", version=4, transport="wss",
               username=f"{GATEWAY}/ws-thermo/?api-version=2021-04-12")
    rc, _, _ = c.connect(expect_success=False)
    assert rc.is_failure


def test_the_wss_listener_can_be_turned_off(start_hub):
    hub = start_hub(wss="off", quic="off")
    assert "wss" not in hub.ports and "quic" not in hub.ports
    c = Client(hub, "still-tls", version=5, transport="tls")
    c.connect()
    c.disconnect()
