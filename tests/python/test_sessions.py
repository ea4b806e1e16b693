"""Persistent sessions, queued messages for offline subscribers, wills, queue limits."""

import time

import pytest

from conftest import Client, PacketTypes, props


def test_v311_persistent_session_queues_qos1_and_qos2(hub, client_factory):
    sub = client_factory("persist-3", version=3, clean=False)
    rc, flags, _ = sub.connect()
    assert flags.session_present is False
    sub.subscribe("p/#", 2)
    sub.disconnect()
    pub = client_factory("p", version=3)
    pub.connect()
    pub.publish("p/1", b"q1", qos=1)
    pub.publish("p/2", b"q2", qos=2)
    pub.publish("p/0", b"q0", qos=0)  # QoS 0 is not kept for offline sessions
    # The hub handles one connection's packets in order: once this PUBACK is
    # back, the QoS 0 message above has been routed too.
    pub.publish("sync/after-p0", b"", qos=1)
    again = client_factory("persist-3", version=3, clean=False)
    rc, flags, _ = again.connect()
    assert flags.session_present is True
    got = [(m.topic, m.payload, m.qos) for m in again.drain(2)]
    assert got == [("p/1", b"q1", 1), ("p/2", b"q2", 2)]
    again.assert_no_message(0.3)


def test_v311_clean_session_discards(hub, client_factory):
    sub = client_factory("clean-3", version=3, clean=False)
    sub.connect()
    sub.subscribe("c/#", 1)
    sub.disconnect()
    fresh = client_factory("clean-3", version=3, clean=True)
    rc, flags, _ = fresh.connect()
    assert flags.session_present is False
    fresh.disconnect()
    pub = client_factory("p", version=3)
    pub.connect()
    pub.publish("c/x", b"x", qos=1)
    back = client_factory("clean-3", version=3, clean=False)
    rc, flags, _ = back.connect()
    assert flags.session_present is False
    back.assert_no_message(0.3)


def test_v5_session_expiry(hub, client_factory):
    cp = props(PacketTypes.CONNECT, SessionExpiryInterval=1)
    sub = client_factory("exp-5", version=5, clean=True, connect_props=cp)
    sub.connect()
    sub.subscribe("e/#", 1)
    sub.disconnect()
    # Within the expiry the session is resumed with its queued message.
    pub = client_factory("p", version=5)
    pub.connect()
    pub.publish("e/1", b"kept", qos=1)
    again = client_factory("exp-5", version=5, clean=False, connect_props=cp)
    rc, flags, _ = again.connect()
    assert flags.session_present is True
    assert again.get().payload == b"kept"
    again.disconnect()
    time.sleep(2.5)
    # After it, the session is gone.
    late = client_factory("exp-5", version=5, clean=False, connect_props=cp)
    rc, flags, _ = late.connect()
    assert flags.session_present is False


def test_v5_session_expiry_zero_ends_session(hub, client_factory):
    sub = client_factory("noexp", version=5, clean=False)
    sub.connect()
    sub.subscribe("z/#", 1)
    sub.disconnect()
    back = client_factory("noexp", version=5, clean=False)
    rc, flags, _ = back.connect()
    assert flags.session_present is False


def test_disconnect_may_set_session_expiry(hub, client_factory):
    cp = props(PacketTypes.CONNECT, SessionExpiryInterval=60)
    sub = client_factory("dexp", version=5, connect_props=cp)
    sub.connect()
    sub.subscribe("d/#", 1)
    sub.disconnect(properties=props(PacketTypes.DISCONNECT, SessionExpiryInterval=0))
    time.sleep(0.3)
    back = client_factory("dexp", version=5, clean=False, connect_props=cp)
    rc, flags, _ = back.connect()
    assert flags.session_present is False


@pytest.mark.parametrize("version", [3, 5])
def test_will_published_on_abnormal_disconnect_only(hub, client_factory, version):
    watcher = client_factory("watch", version=version)
    watcher.connect()
    watcher.subscribe("will/#", 1)
    graceful = client_factory("g", version=version,
                              will={"topic": "will/g", "payload": b"gone-g", "qos": 1})
    graceful.connect()
    graceful.disconnect()
    watcher.assert_no_message(0.5)
    crashing = client_factory("c", version=version,
                              will={"topic": "will/c", "payload": b"gone-c", "qos": 1, "retain": True})
    crashing.connect()
    crashing.kill()
    m = watcher.get()
    assert (m.topic, m.payload) == ("will/c", b"gone-c")
    # The will was retained.
    late = client_factory("late", version=version)
    late.connect()
    late.subscribe("will/c", 1)
    assert late.get().retain is True


def test_v5_disconnect_with_will_message(hub, client_factory):
    watcher = client_factory("watch")
    watcher.connect()
    watcher.subscribe("will/x", 1)
    c = client_factory("dw", will={"topic": "will/x", "payload": b"asked", "qos": 1})
    c.connect()
    c.disconnect(reasoncode=__import__("paho.mqtt.reasoncodes", fromlist=["ReasonCode"]).ReasonCode(
        PacketTypes.DISCONNECT, identifier=0x04))
    assert watcher.get().payload == b"asked"


def test_v5_will_delay(hub, client_factory):
    watcher = client_factory("watch")
    watcher.connect()
    watcher.subscribe("will/d", 1)
    wp = props(PacketTypes.WILLMESSAGE, WillDelayInterval=2)
    cp = props(PacketTypes.CONNECT, SessionExpiryInterval=60)
    # Reconnecting within the delay cancels the will.
    c = client_factory("delayed", connect_props=cp,
                       will={"topic": "will/d", "payload": b"late", "qos": 1, "properties": wp})
    c.connect()
    c.kill()
    time.sleep(0.5)
    back = client_factory("delayed", clean=False, connect_props=cp)
    back.connect()
    watcher.assert_no_message(2.5)
    back.disconnect()
    # Not reconnecting: published after the delay, not before.
    c2 = client_factory("delayed2", connect_props=cp,
                        will={"topic": "will/d", "payload": b"late2", "qos": 1, "properties": wp})
    c2.connect()
    c2.kill()
    watcher.assert_no_message(1.0)
    assert watcher.get(timeout=5).payload == b"late2"


def test_queue_limit_drops_newest_for_offline_session(start_hub):
    hub = start_hub("--max-queued-messages", "5")
    sub = Client(hub, "limited", version=3, clean=False)
    sub.connect()
    sub.subscribe("l/#", 1)
    sub.disconnect()
    pub = Client(hub, "p", version=3)
    pub.connect()
    for i in range(10):
        pub.publish("l/x", str(i).encode(), qos=1)
    back = Client(hub, "limited", version=3, clean=False)
    back.connect()
    assert [m.payload for m in back.drain(5)] == [b"0", b"1", b"2", b"3", b"4"]
    back.assert_no_message(0.5)
    back.disconnect()
    pub.disconnect()
