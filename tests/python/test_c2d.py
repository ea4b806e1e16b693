"""Cloud-to-device settlement through the MQTT head, with hand-built packets
so the test decides exactly when (and whether) a device acknowledges: a
PUBACK completes; a connection that ends without one abandons the message,
which the next connection gets again with its delivery count one higher; a
message delivered the maximum number of times without being completed is
dead-lettered; an expired message is never delivered."""

import json
import struct
import time

import pytest

import rawmqtt as raw
from test_iothub_auth import DEV_KEY, GATEWAY, sas

TOPIC = "devices/dev1/messages/devicebound/#"


@pytest.fixture
def c2d_hub(start_hub, tmp_path):
    def start(*args):
        ids = tmp_path / "identities.json"
        ids.write_text(json.dumps({"devices": [{"deviceId": "dev1", "primaryKey": DEV_KEY}]}))
        return start_hub("--identities", str(ids), *args, allow_anonymous=False)
    return start


def connect_device(hub):
    """dev1 over plain TCP, subscribed to its cloud-to-device topic (QoS 1)."""
    sock = raw.open_conn(hub.port("tcp"))
    sock.sendall(raw.connect("dev1", version=4, username=f"{GATEWAY}/dev1/?api-version=2021-04-12",
                             password=sas(f"{GATEWAY}/devices/dev1", DEV_KEY)))
    first, body = raw.read_packet(sock)
    assert (first, body[1]) == (0x20, 0), "CONNACK accepted"
    sock.sendall(raw.packet(0x82, struct.pack("!H", 1) + raw.s(TOPIC) + bytes([1])))
    first, body = raw.read_packet(sock)
    assert first == 0x90 and body[2] == 1, "SUBACK granted QoS 1"
    return sock


def next_publish(sock, timeout=10):
    """(packet id, topic, payload) of the next PUBLISH, or None if none comes."""
    sock.settimeout(timeout)
    try:
        p = raw.read_packet(sock)
    except TimeoutError:
        return None
    if p is None:
        return None
    first, body = p
    assert first >> 4 == 3, f"expected PUBLISH, got {first:#x}"
    n = struct.unpack("!H", body[:2])[0]
    topic = body[2:2 + n].decode()
    pid = struct.unpack("!H", body[2 + n:4 + n])[0]
    return pid, topic, body[4 + n:]


def puback(sock, pid):
    sock.sendall(raw.packet(0x40, struct.pack("!H", pid)))


def send_c2d(hub, body, **kw):
    return hub.api("POST", "/api/devices/dev1/messages", {"body": body, **kw})["seq"]


def queued(hub):
    return hub.outbox(endpoint="c2d:dev1")


def wait_until(cond, what, timeout=10):
    deadline = time.time() + timeout
    while not cond():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def outcome(hub, name):
    return hub.metrics().get(f'edgehub_c2d_messages_total{{outcome="{name}"}}', 0)


def test_puback_completes(c2d_hub):
    hub = c2d_hub()
    sock = connect_device(hub)
    send_c2d(hub, "one", messageId="m-1")
    pid, topic, payload = next_publish(sock)
    assert payload == b"one" and topic.startswith("devices/dev1/messages/devicebound/")
    assert "%24.mid=m-1" in topic or "$.mid=m-1" in topic
    puback(sock, pid)
    wait_until(lambda: queued(hub) == [], "the completed message to leave the queue")
    assert outcome(hub, "completed") == 1
    sock.close()


def test_abandoned_by_a_lost_connection_comes_again_with_a_higher_count(c2d_hub):
    hub = c2d_hub()
    sock = connect_device(hub)
    send_c2d(hub, "again")
    pid, _, payload = next_publish(sock)
    assert payload == b"again"
    assert [m["delivery_count"] for m in queued(hub)] == [1]
    sock.close()  # gone without a PUBACK: abandoned
    sock = connect_device(hub)
    pid, _, payload = next_publish(sock)
    assert payload == b"again", "redelivered to the next connection"
    assert [m["delivery_count"] for m in queued(hub)] == [2]
    puback(sock, pid)
    wait_until(lambda: queued(hub) == [], "the message to be completed")
    assert outcome(hub, "completed") == 1
    sock.close()


def test_maximum_delivery_count_dead_letters_and_the_next_message_goes_on(c2d_hub):
    hub = c2d_hub("--c2d-max-delivery-count", "2")
    send_c2d(hub, "poison")
    send_c2d(hub, "fine")
    # The device completes "fine" but never "poison".
    sock = connect_device(hub)
    got = {}
    for _ in range(2):
        pid, _, payload = next_publish(sock)
        got[payload] = pid
    assert set(got) == {b"poison", b"fine"}
    puback(sock, got[b"fine"])
    wait_until(lambda: [m["delivery_count"] for m in queued(hub)] == [1], "only poison left")
    sock.close()
    sock = connect_device(hub)
    _, _, payload = next_publish(sock)
    assert payload == b"poison"
    sock.close()
    # Twice delivered, never completed: dead-lettered, not delivered a third time.
    sock = connect_device(hub)
    assert next_publish(sock, timeout=2) is None
    wait_until(lambda: queued(hub) == [], "the dead-lettered message to leave the queue")
    send_c2d(hub, "after")
    pid, _, payload = next_publish(sock)
    assert payload == b"after", "the queue goes on"
    puback(sock, pid)
    wait_until(lambda: outcome(hub, "completed") == 2, "two completions")
    assert outcome(hub, "dead_lettered") == 1
    assert "dead-lettered" in hub.log()
    sock.close()


def test_expired_message_is_never_delivered(c2d_hub):
    hub = c2d_hub()
    send_c2d(hub, "stale", ttlSecs=1)
    send_c2d(hub, "fresh")
    time.sleep(1.5)
    sock = connect_device(hub)
    pid, _, payload = next_publish(sock)
    assert payload == b"fresh"
    puback(sock, pid)
    assert next_publish(sock, timeout=1) is None
    wait_until(lambda: queued(hub) == [], "the queue to empty")
    sock.close()


def test_bad_max_delivery_count_is_refused_at_start(binary, tmp_path):
    import subprocess
    r = subprocess.run([binary, "--data-dir", str(tmp_path / "d"), "--c2d-max-delivery-count", "0"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode != 0
    assert "c2d-max-delivery-count" in r.stderr
