"""Two real edgehub processes, child and parent, on loopback with TLS: the
child forwards its `$upstream` queue to the parent (over MQTT, one connection
per downstream identity; over AMQP, one connection for all), keeps everything
through a parent outage (and a kill -9 of its own), and backs off instead of
hammering a parent that refuses it."""

import base64
import json
import signal
import socket
import time

import pytest

from test_iothub_auth import DEV_KEY
from test_store import Device, bodies, wait_for

HUB = "myhub.azure-devices.net"
MOD_KEY = base64.b64encode(b"upstream-module-key-0123456789ab").decode()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(params=["mqtt", "amqp"])
def pair(start_hub, tmp_path, request):
    """(start parent, start child, protocol): the child's link to the parent
    over MQTT (a connection per identity) or AMQP (one for all)."""
    protocol = request.param
    ids = tmp_path / "identities.json"
    ids.write_text(json.dumps({"iothubHostname": HUB, "devices": [
        {"deviceId": "leaf1", "primaryKey": DEV_KEY},
        {"deviceId": "leaf2", "primaryKey": DEV_KEY,
         "modules": [{"moduleId": "m", "primaryKey": MOD_KEY}]}]}))
    port = free_port()

    listen = {"mqtts" if protocol == "mqtt" else "amqps": f"127.0.0.1:{port}"}

    def parent():
        return start_hub("--identities", str(ids), name="parent", allow_anonymous=False, **listen)

    def child(*extra, hostname=HUB, ca=None):
        return start_hub("--identities", str(ids), "--upstream", f"{protocol}s://localhost:{port}",
                         "--upstream-ca", str(ca or tmp_path / "parent" / "ca.pem"),
                         "--iothub-hostname", hostname, *extra, name="child", allow_anonymous=False)
    return parent, child, protocol


def send(hub, device_id, n, start=0, props="kind=t"):
    d = Device(hub, device_id)
    for i in range(start, start + n):
        d.c.publish(f"devices/{device_id}/messages/events/{props}&n={i}", f"{device_id}-{i}".encode(), 1)
    wait_for(lambda: len(d.acked) == n, what=f"{n} PUBACKs from the child")
    d.stop()


def ready(hub):
    import urllib.request
    with urllib.request.urlopen(f"http://127.0.0.1:{hub.ports['management']}/readyz", timeout=10) as r:
        assert r.status == 200
        return json.loads(r.read())


def established(port):
    """TCP connections established to 127.0.0.1:`port` (the parent's side,
    from /proc/net/tcp)."""
    local = f"0100007F:{port:04X}"
    with open("/proc/net/tcp") as f:
        rows = [line.split() for line in f.readlines()[1:]]
    return sum(1 for r in rows if r[1] == local and r[3] == "01")


def by_device(messages):
    out = {}
    for m in messages:
        out.setdefault(m["system_properties"]["connectionDeviceId"], []).append(
            base64.b64decode(m["body"]).decode())
    return out


def test_child_forwards_with_each_identity_and_properties(pair):
    parent = pair[0]()
    child = pair[1]()
    send(child, "leaf1", 10)
    send(child, "leaf2", 5)
    wait_for(lambda: len(parent.outbox()) == 15, what="15 messages at the parent")
    out = parent.outbox()
    assert by_device(out) == {"leaf1": [f"leaf1-{i}" for i in range(10)],
                              "leaf2": [f"leaf2-{i}" for i in range(5)]}
    m = out[0]
    assert m["properties"]["kind"] == "t"
    assert "connectionModuleId" not in m["system_properties"]
    # While both identities are connected to the child (their cloud-to-edge
    # links open upstream): over MQTT a connection each, over AMQP one for
    # both (a session each).
    here = [Device(child, "leaf1"), Device(child, "leaf2")]
    port = parent.ports["mqtts" if pair[2] == "mqtt" else "amqps"]
    want = 2 if pair[2] == "mqtt" else 1
    wait_for(lambda: established(port) == want, what=f"{want} connection(s) to the parent")
    time.sleep(0.5)
    assert established(port) == want
    for d in here:
        d.stop()
    # Forwarded means acknowledged by the parent: gone from the child.
    wait_for(lambda: child.outbox() == [], what="the child's queue to empty")
    assert child.metrics()['edgehub_queue_length{endpoint="$upstream",priority="10"}'] == 0
    assert parent.metrics()['edgehub_queue_length{endpoint="$upstream",priority="10"}'] == 15


def test_parent_outage_and_child_kill_lose_nothing_and_keep_order(pair):
    parent = pair[0]()
    child = pair[1]()
    send(child, "leaf1", 5)
    wait_for(lambda: len(parent.outbox()) == 5, what="the first five upstream")
    parent.stop(signal.SIGKILL)
    send(child, "leaf1", 20, start=5)   # acknowledged by the child: stored
    send(child, "leaf2", 10)
    assert len(child.outbox()) == 30
    assert "upstream link down" in child.log()
    r = ready(child)
    assert r["ready"] is True, "an upstream outage does not make the hub unready"
    assert r["upstream"]["state"] == "down" and "connect" in r["upstream"]["reason"]
    m = child.metrics()
    assert m["edgehub_offline_count_total"] == 1 and m["edgehub_offline_duration_seconds"] > 0
    child.stop(signal.SIGKILL)          # and the child crashes meanwhile
    child = pair[1]()
    parent = pair[0]()
    wait_for(lambda: len(parent.outbox()) == 35, timeout=60, what="the backlog to drain")
    got = by_device(parent.outbox())
    # At least once, in order per device (a duplicate may only repeat a
    # message the parent acknowledged just before the kill).
    leaf1 = list(dict.fromkeys(got["leaf1"]))
    assert leaf1 == [f"leaf1-{i}" for i in range(25)]
    assert list(dict.fromkeys(got["leaf2"])) == [f"leaf2-{i}" for i in range(10)]
    wait_for(lambda: child.outbox() == [], what="the child's queue to empty")
    assert "upstream link up" in child.log()
    assert ready(child)["upstream"]["state"] == "up"
    assert ready(parent)["upstream"] is None, "the parent is a root hub"


def test_refusing_parent_gets_backoff_not_a_storm_and_nothing_is_lost(pair):
    import time
    parent = pair[0]()
    # Tokens for a host name the parent does not know: every CONNECT refused.
    child = pair[1](hostname="wrong.example")
    send(child, "leaf1", 3)
    time.sleep(4)
    refusal = "connection refused" if pair[2] == "mqtt" else "CBS token refused"
    refusals = parent.log().count(refusal)
    assert 1 <= refusals <= 8, f"{refusals} connection attempts in 4 s"
    assert "bad user name or password" in child.log() or "upstream refused" in child.log()
    assert child.log().count("upstream link down") == 1, "one log line per state change"
    assert len(child.outbox()) == 3
    assert parent.outbox() == []


def test_parent_certificate_that_does_not_verify_is_a_clear_error(pair, tmp_path):
    import time
    parent = pair[0]()
    # Trust some other CA instead of the parent's.
    import certs
    wrong_ca = certs.write(tmp_path, "wrong-ca", *certs.make_cert("not the parent's CA", ca=True))[0]
    child = pair[1](ca=wrong_ca)
    send(child, "leaf1", 2)
    time.sleep(2)
    log = child.log()
    assert "upstream link down" in log and "TLS handshake" in log
    assert "UnknownIssuer" in log or "certificate" in log.lower()
    assert len(child.outbox()) == 2 and parent.outbox() == []
