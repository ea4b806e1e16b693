"""PUBLISH at every QoS in both directions, wildcards, retained messages, topic validation."""

import pytest

import rawmqtt as raw
from conftest import PacketTypes, props

TRANSPORTS = ["tcp", "tls"]
VERSIONS = [3, 5]


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("version", VERSIONS)
def test_qos_levels_both_directions(hub, client_factory, transport, version):
    sub = client_factory(f"sub-{transport}-{version}", version=version, transport=transport)
    sub.connect()
    assert [r.value for r in sub.subscribe("q/#", 2)] == [2]
    pub = client_factory(f"pub-{transport}-{version}", version=version, transport=transport)
    pub.connect()
    for qos in (0, 1, 2):
        pub.publish(f"q/{qos}", f"payload-{qos}".encode(), qos=qos)
        m = sub.get()
        assert (m.topic, m.payload, m.qos, m.retain) == (f"q/{qos}", f"payload-{qos}".encode(), qos, False)


def test_qos_is_downgraded_to_subscription(hub, client_factory):
    sub = client_factory("down", version=3)
    sub.connect()
    sub.subscribe("d/t", 1)
    pub = client_factory("p", version=3)
    pub.connect()
    pub.publish("d/t", b"x", qos=2)
    assert sub.get().qos == 1
    pub.publish("d/t", b"y", qos=0)
    assert sub.get().qos == 0


def test_wildcards_and_dollar_topics(hub, client_factory):
    plus = client_factory("plus")
    plus.connect()
    plus.subscribe("w/+/c", 0)
    hashc = client_factory("hash")
    hashc.connect()
    hashc.subscribe("#", 0)
    sys_sub = client_factory("sys")
    sys_sub.connect()
    sys_sub.subscribe("$SYS/#", 0)
    pub = client_factory("p")
    pub.connect()
    pub.publish("w/b/c", b"1", qos=1)
    pub.publish("w/b/d", b"2", qos=1)
    pub.publish("$SYS/x", b"3", qos=1)
    assert plus.get().payload == b"1"
    plus.assert_no_message(0.3)
    assert [m.payload for m in hashc.drain(2)] == [b"1", b"2"]
    hashc.assert_no_message(0.3)  # '#' does not match $-topics
    assert sys_sub.get().payload == b"3"


def test_overlapping_subscriptions_deliver_once(hub, client_factory):
    sub = client_factory("overlap", version=3)
    sub.connect()
    sub.subscribe("o/#", 0)
    sub.subscribe("o/+", 1)
    pub = client_factory("p", version=3)
    pub.connect()
    pub.publish("o/x", b"x", qos=1)
    m = sub.get()
    assert m.qos == 1
    sub.assert_no_message(0.3)


@pytest.mark.parametrize("version", VERSIONS)
def test_retained_messages(hub, client_factory, version):
    pub = client_factory("rp", version=version)
    pub.connect()
    pub.publish("r/a", b"kept", qos=1, retain=True)
    pub.publish("r/b", b"also", qos=0, retain=True)
    pub.publish("sync/after-r-b", b"", qos=1)  # in-order round trip: r/b is stored
    sub = client_factory("rs", version=version)
    sub.connect()
    sub.subscribe("r/+", 1)
    got = sorted((m.topic, m.payload, m.retain) for m in sub.drain(2))
    assert got == [("r/a", b"kept", True), ("r/b", b"also", True)]
    # Live messages carry retain=0 for a normal subscription.
    pub.publish("r/a", b"new", qos=1, retain=True)
    m = sub.get()
    assert (m.payload, m.retain) == (b"new", False)
    # An empty retained payload clears it.
    pub.publish("r/a", b"", qos=1, retain=True)
    assert sub.get().payload == b""
    late = client_factory("late", version=version)
    late.connect()
    late.subscribe("r/+", 1)
    assert [(m.topic, m.payload) for m in late.drain(1)] == [("r/b", b"also")]
    late.assert_no_message(0.3)


@pytest.mark.parametrize("version", [4, 5])
def test_publish_to_wildcard_topic_closes(hub, version):
    sock = raw.open_conn(hub.port("tcp"))
    sock.sendall(raw.connect("bad-topic", version=version))
    assert raw.read_packet(sock)[0] == 0x20
    body = raw.s("a/+") + b"\x00\x01" + (b"\x00" if version == 5 else b"") + b"x"
    sock.sendall(raw.packet(0x32, body))
    if version == 5:
        first, reply = raw.read_packet(sock)
        assert first == 0xE0 and reply[0] == 0x90  # Topic Name invalid
    assert raw.closed(sock)


@pytest.mark.parametrize("version", [4, 5])
def test_invalid_filters_refused_in_suback(hub, version):
    # paho refuses to send bad filters, so these are hand-built.
    sock = raw.open_conn(hub.port("tcp"))
    sock.sendall(raw.connect("badfilter", version=version))
    raw.read_packet(sock)
    filters = b"".join(raw.s(f) + b"\x01" for f in ["a/#/b", "ok/+", "x+", "$share//t", "$share/g/ok"])
    sock.sendall(raw.packet(0x82, b"\x00\x07" + (b"\x00" if version == 5 else b"") + filters))
    first, body = raw.read_packet(sock)
    assert first == 0x90
    bad = 0x8F if version == 5 else 0x80
    rest = body[3:] if version == 5 else body[2:]
    assert body[:2] == b"\x00\x07"
    assert list(rest) == [bad, 1, bad, bad, 1]


def test_unsubscribe(hub, client_factory):
    c = client_factory("unsub")
    c.connect()
    c.subscribe("u/t", 1)
    assert [r.value for r in c.unsubscribe("u/t")] == [0]
    assert [r.value for r in c.unsubscribe("u/t")] == [0x11]  # No subscription existed
    p = client_factory("p")
    p.connect()
    p.publish("u/t", b"x", qos=1)
    c.assert_no_message(0.3)
