"""CONNECT/CONNACK, authentication seam, client ids, takeover, keep-alive."""

import time

import pytest

import rawmqtt as raw
from conftest import Client, PacketTypes, props

TRANSPORTS = ["tcp", "tls"]
VERSIONS = [3, 5]


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("version", VERSIONS)
def test_connect_succeeds(hub, client_factory, transport, version):
    c = client_factory("dev-1", version=version, transport=transport)
    rc, flags, p = c.connect()
    assert rc.value == 0
    assert flags.session_present is False
    if version == 5:
        assert p.ReceiveMaximum == 128
        assert p.MaximumPacketSize == 256 * 1024
        assert p.TopicAliasMaximum == 64


def test_anonymous_refused_without_switch(start_hub):
    hub = start_hub(allow_anonymous=False)
    # MQTT 3.1.1: return code 5 "not authorized", then the connection closes.
    sock = raw.open_conn(hub.port("tcp"))
    sock.sendall(raw.connect("anon", version=4))
    assert raw.read_packet(sock) == (0x20, bytes([0, 5]))
    assert raw.closed(sock)
    # Credentials that name no identity are refused the same way, as IoT Hub
    # refuses every credential it does not accept: code 5.
    sock = raw.open_conn(hub.port("tcp"))
    sock.sendall(raw.connect("anon", version=4, username="u", password="p"))
    assert raw.read_packet(sock) == (0x20, bytes([0, 5]))
    # MQTT 5 over TLS via paho: 0x87 Not authorized.
    c = Client(hub, "anon5", version=5, transport="tls")
    rc, _, _ = c.connect(expect_success=False)
    assert rc.value == 0x87
    c.c.loop_stop()
    assert "connection refused" in hub.log()


def test_unsupported_protocol_version_and_bad_first_packet(hub):
    sock = raw.open_conn(hub.port("tcp"))
    sock.sendall(raw.connect("x", version=3))
    assert raw.read_packet(sock) == (0x20, bytes([0, 1]))
    assert raw.closed(sock)
    # A first packet that is not CONNECT: closed without an answer.
    sock = raw.open_conn(hub.port("tcp"))
    sock.sendall(raw.packet(0xC0, b""))
    assert raw.closed(sock)


def test_empty_client_id(hub, client_factory):
    # MQTT 3.1.1 without clean session: identifier rejected (2).
    sock = raw.open_conn(hub.port("tcp"))
    sock.sendall(raw.connect("", version=4, clean=False))
    assert raw.read_packet(sock) == (0x20, bytes([0, 2]))
    # MQTT 5: the hub assigns one and says which.
    c = client_factory("", version=5)
    rc, _, p = c.connect()
    assert p.AssignedClientIdentifier.startswith("auto-")


@pytest.mark.parametrize("version", VERSIONS)
def test_session_takeover(hub, client_factory, version):
    first = client_factory("same-id", version=version)
    first.connect()
    first.subscribe("t/takeover", 1)
    second = client_factory("same-id", version=version)
    second.connect()
    rc, _ = first.disconnects.get(timeout=5)
    if version == 5:
        assert rc.value == 0x8E  # Session taken over
    # The new connection works and the old one gets nothing any more.
    second.subscribe("t/takeover", 1)
    pub = client_factory("pub", version=version)
    pub.connect()
    pub.publish("t/takeover", b"x", qos=1)
    assert second.get().payload == b"x"
    first.assert_no_message(0.3)


def test_keep_alive_enforced(hub):
    sock = raw.open_conn(hub.port("tcp"))
    sock.sendall(raw.connect("ka", version=4, keepalive=1))
    assert raw.read_packet(sock) == (0x20, bytes([0, 0]))
    start = time.time()
    # Silent client: closed after 1.5 x keep-alive (allow generous slack).
    assert raw.closed(sock, timeout=10)
    assert time.time() - start >= 1.4


def test_keep_alive_satisfied_by_pings(hub):
    sock = raw.open_conn(hub.port("tcp"))
    sock.sendall(raw.connect("ka2", version=4, keepalive=1))
    assert raw.read_packet(sock)[0] == 0x20
    for _ in range(4):
        time.sleep(0.5)
        sock.sendall(raw.packet(0xC0, b""))
        assert raw.read_packet(sock) == (0xD0, b"")


def test_v5_keep_alive_timeout_reason(hub):
    sock = raw.open_conn(hub.port("tcp"))
    sock.sendall(raw.connect("ka5", version=5, keepalive=1))
    assert raw.read_packet(sock)[0] == 0x20
    first, body = raw.read_packet(sock)
    assert first == 0xE0 and body[0] == 0x8D  # Keep alive timeout


def test_server_keep_alive(start_hub):
    hub = start_hub("--max-keep-alive", "5")
    c = Client(hub, "ska", version=5, keepalive=60)
    rc, _, p = c.connect()
    assert p.ServerKeepAlive == 5
    c.disconnect()
