"""MQTT 5 features: properties, expiry, aliases, flow control, packet size,
subscription options and identifiers, shared subscriptions, request/response."""

import time

import pytest

import rawmqtt as raw
from conftest import Client, PacketTypes, props
from paho.mqtt.subscribeoptions import SubscribeOptions


def test_properties_forwarded_request_response(hub, client_factory):
    responder = client_factory("responder")
    responder.connect()
    responder.subscribe("req/svc", 1)
    requester = client_factory("requester")
    requester.connect()
    requester.subscribe("resp/requester", 1)
    pp = props(PacketTypes.PUBLISH, ResponseTopic="resp/requester", CorrelationData=b"\x01\x02",
               ContentType="application/json", UserProperty=[("a", "1"), ("a", "2")],
               PayloadFormatIndicator=1)
    requester.publish("req/svc", b'{"x":1}', qos=1, properties=pp)
    req = responder.get()
    p = req.properties
    assert p.ResponseTopic == "resp/requester"
    assert p.CorrelationData == b"\x01\x02"
    assert p.ContentType == "application/json"
    assert p.UserProperty == [("a", "1"), ("a", "2")]
    assert p.PayloadFormatIndicator == 1
    responder.publish(p.ResponseTopic, b"ok", qos=1,
                      properties=props(PacketTypes.PUBLISH, CorrelationData=p.CorrelationData))
    resp = requester.get()
    assert resp.payload == b"ok" and resp.properties.CorrelationData == b"\x01\x02"


def test_payload_format_invalid(hub, client_factory):
    c = client_factory("pfi")
    c.connect()
    info = c.c.publish("x/y", b"\xff\xfe", 1, properties=props(PacketTypes.PUBLISH, PayloadFormatIndicator=1))
    info.wait_for_publish(5)
    # paho reports the PUBACK reason code through on_publish; check via a raw client below.
    sock = raw.open_conn(hub.port("tcp"))
    sock.sendall(raw.connect("pfi-raw", version=5))
    raw.read_packet(sock)
    body = raw.s("x/y") + b"\x00\x07" + b"\x02\x01\x01" + b"\xff\xfe"
    sock.sendall(raw.packet(0x32, body))
    first, reply = raw.read_packet(sock)
    assert first == 0x40 and reply[:3] == b"\x00\x07\x99"


def test_message_expiry(hub, client_factory):
    pub = client_factory("pub")
    pub.connect()
    pub.publish("exp/r", b"short", qos=1, retain=True,
                properties=props(PacketTypes.PUBLISH, MessageExpiryInterval=1))
    pub.publish("exp/k", b"long", qos=1, retain=True,
                properties=props(PacketTypes.PUBLISH, MessageExpiryInterval=100))
    time.sleep(1.5)
    sub = client_factory("sub")
    sub.connect()
    sub.subscribe("exp/#", 1)
    m = sub.get()
    assert m.payload == b"long"
    assert 0 < m.properties.MessageExpiryInterval <= 100
    sub.assert_no_message(0.3)


def test_no_matching_subscribers_reason(hub):
    sock = raw.open_conn(hub.port("tcp"))
    sock.sendall(raw.connect("nms", version=5))
    raw.read_packet(sock)
    sock.sendall(raw.packet(0x32, raw.s("nobody/here") + b"\x00\x05\x00x"))
    assert raw.read_packet(sock) == (0x40, b"\x00\x05\x10")


def test_incoming_topic_alias(hub, client_factory):
    sub = client_factory("sub")
    sub.connect()
    sub.subscribe("alias/t", 1)
    pub = client_factory("apub")
    pub.connect()
    pub.publish("alias/t", b"1", qos=1, properties=props(PacketTypes.PUBLISH, TopicAlias=3))
    pub.publish("", b"2", qos=1, properties=props(PacketTypes.PUBLISH, TopicAlias=3))
    assert [(m.topic, m.payload) for m in sub.drain(2)] == [("alias/t", b"1"), ("alias/t", b"2")]


def test_invalid_topic_alias_disconnects(hub):
    sock = raw.open_conn(hub.port("tcp"))
    sock.sendall(raw.connect("badalias", version=5))
    raw.read_packet(sock)
    # Alias 65 exceeds the announced maximum of 64.
    sock.sendall(raw.packet(0x30, raw.s("t") + b"\x03\x23\x00\x41" + b"x"))
    first, body = raw.read_packet(sock)
    assert first == 0xE0 and body[0] == 0x94
    # Unknown alias with empty topic: protocol error.
    sock = raw.open_conn(hub.port("tcp"))
    sock.sendall(raw.connect("badalias2", version=5))
    raw.read_packet(sock)
    sock.sendall(raw.packet(0x30, raw.s("") + b"\x03\x23\x00\x05" + b"x"))
    first, body = raw.read_packet(sock)
    assert first == 0xE0 and body[0] == 0x82


def test_no_local_retain_as_published_retain_handling(hub, client_factory):
    me = client_factory("me")
    me.connect()
    me.subscribe("nl/t", options=SubscribeOptions(qos=1, noLocal=True))
    me.subscribe("rap/t", options=SubscribeOptions(qos=1, retainAsPublished=True))
    me.publish("nl/t", b"mine", qos=1)
    me.assert_no_message(0.3)
    other = client_factory("other")
    other.connect()
    other.publish("nl/t", b"theirs", qos=1)
    assert me.get().payload == b"theirs"
    other.publish("rap/t", b"r", qos=1, retain=True)
    assert me.get().retain is True  # retain as published
    # Retain handling 1: only when the subscription is new; 2: never.
    rh = client_factory("rh")
    rh.connect()
    rh.subscribe("rap/t", options=SubscribeOptions(qos=1, retainHandling=1))
    assert rh.get().payload == b"r"
    rh.subscribe("rap/t", options=SubscribeOptions(qos=1, retainHandling=1))
    rh.assert_no_message(0.3)
    rh2 = client_factory("rh2")
    rh2.connect()
    rh2.subscribe("rap/t", options=SubscribeOptions(qos=1, retainHandling=2))
    rh2.assert_no_message(0.3)
    rh.subscribe("rap/t", options=SubscribeOptions(qos=1, retainHandling=0))
    assert rh.get().payload == b"r"


def test_subscription_identifiers(hub, client_factory):
    c = client_factory("sid")
    c.connect()
    c.subscribe("sid/+", 1, properties=props(PacketTypes.SUBSCRIBE, SubscriptionIdentifier=7))
    c.subscribe("sid/#", 1, properties=props(PacketTypes.SUBSCRIBE, SubscriptionIdentifier=9))
    p = client_factory("p")
    p.connect()
    p.publish("sid/x", b"x", qos=1)
    m = c.get()
    assert sorted(m.properties.SubscriptionIdentifier) == [7, 9]
    c.assert_no_message(0.3)


def test_shared_subscriptions(hub, client_factory):
    members = []
    for i in range(2):
        m = client_factory(f"member-{i}")
        m.connect()
        assert [r.value for r in m.subscribe("$share/grp/sh/#", 1)] == [1]
        members.append(m)
    plain = client_factory("plain")
    plain.connect()
    plain.subscribe("sh/#", 1)
    p = client_factory("p")
    p.connect()
    for i in range(20):
        p.publish("sh/x", str(i).encode(), qos=1)
    got = []
    for m in members:
        while True:
            try:
                got.append(m.get(timeout=1).payload)
            except Exception:
                break
    assert sorted(got, key=int) == [str(i).encode() for i in range(20)]
    assert all(not m.messages.qsize() for m in members)
    assert len(plain.drain(20)) == 20


def test_shared_subscription_no_local_is_protocol_error(hub, client_factory):
    c = client_factory("shnl")
    c.connect()
    c.c.subscribe("$share/g/t", options=SubscribeOptions(qos=1, noLocal=True))
    rc, _ = c.disconnects.get(timeout=5)
    assert rc.value == 0x82


def test_client_maximum_packet_size_respected(hub, client_factory):
    small = client_factory("small", connect_props=props(PacketTypes.CONNECT, MaximumPacketSize=100))
    small.connect()
    small.subscribe("big/#", 1)
    p = client_factory("p")
    p.connect()
    p.publish("big/x", b"x" * 500, qos=1)
    p.publish("big/y", b"ok", qos=1)
    m = small.get()
    assert m.payload == b"ok"  # the oversized one was discarded, not sent


@pytest.mark.parametrize("version", [4, 5])
def test_server_maximum_packet_size(start_hub, version):
    hub = start_hub("--max-packet-size", "1024")
    sock = raw.open_conn(hub.port("tcp"))
    sock.sendall(raw.connect("big", version=version))
    raw.read_packet(sock)
    body = raw.s("t") + b"\x00\x01" + (b"\x00" if version == 5 else b"") + b"x" * 2000
    sock.sendall(raw.packet(0x32, body))
    if version == 5:
        first, reply = raw.read_packet(sock)
        assert first == 0xE0 and reply[0] == 0x95
    assert raw.closed(sock)


def test_outgoing_receive_maximum(hub, client_factory):
    """The hub never has more unacknowledged QoS 1 messages out than the client allows."""
    sock = raw.open_conn(hub.port("tcp"))
    # Receive Maximum (0x21) = 2.
    sock.sendall(raw.connect("rm", version=5, props=b"\x21\x00\x02"))
    raw.read_packet(sock)
    sock.sendall(raw.packet(0x82, b"\x00\x01\x00" + raw.s("rm/t") + b"\x01"))
    assert raw.read_packet(sock)[0] == 0x90
    p = client_factory("p")
    p.connect()
    for i in range(5):
        p.publish("rm/t", str(i).encode(), qos=1)
    ids = []
    for _ in range(2):
        first, body = raw.read_packet(sock)
        assert first & 0xF0 == 0x30
        ids.append(body[6:8])
    sock.settimeout(0.5)
    with pytest.raises(TimeoutError):
        raw.read_packet(sock)
    sock.settimeout(5)
    sock.sendall(raw.packet(0x40, ids[0]))
    first, body = raw.read_packet(sock)
    assert first & 0xF0 == 0x30 and body.endswith(b"2")


def test_incoming_receive_maximum_exceeded(start_hub):
    hub = start_hub("--receive-maximum", "2")
    sock = raw.open_conn(hub.port("tcp"))
    sock.sendall(raw.connect("rmx", version=5))
    raw.read_packet(sock)
    for pid in (1, 2, 3):
        sock.sendall(raw.packet(0x34, raw.s("t") + bytes([0, pid]) + b"\x00x"))
    assert raw.read_packet(sock)[0] == 0x50
    assert raw.read_packet(sock)[0] == 0x50
    first, body = raw.read_packet(sock)
    assert first == 0xE0 and body[0] == 0x93


def test_qos2_duplicate_suppressed(hub, client_factory):
    sub = client_factory("sub")
    sub.connect()
    sub.subscribe("q2/t", 2)
    sock = raw.open_conn(hub.port("tcp"))
    sock.sendall(raw.connect("q2raw", version=4))
    raw.read_packet(sock)
    pub = raw.packet(0x34, raw.s("q2/t") + b"\x00\x09" + b"once")
    dup = raw.packet(0x3C, raw.s("q2/t") + b"\x00\x09" + b"once")
    sock.sendall(pub)
    assert raw.read_packet(sock) == (0x50, b"\x00\x09")
    sock.sendall(dup)
    assert raw.read_packet(sock) == (0x50, b"\x00\x09")
    sock.sendall(raw.packet(0x62, b"\x00\x09"))
    assert raw.read_packet(sock) == (0x70, b"\x00\x09")
    assert sub.get().payload == b"once"
    sub.assert_no_message(0.5)
    # After PUBREL the id is free: the same id is a new message.
    sock.sendall(pub)
    assert raw.read_packet(sock) == (0x50, b"\x00\x09")
    assert sub.get().payload == b"once"
