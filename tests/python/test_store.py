"""Store-and-forward through the real binary: IoT Hub telemetry is routed,
committed to RocksDB before its PUBACK, and read back from the `$upstream`
outbox over the management API — across graceful restarts and kill -9."""

import base64
import json
import random
import signal
import threading
import time

import paho.mqtt.client as mqtt
import pytest

from test_iothub_auth import DEV_KEY, GATEWAY, sas

DEVICES = [f"dev{i}" for i in range(4)]


def identities(tmp_path):
    p = tmp_path / "identities.json"
    p.write_text(json.dumps({
        "iothubHostname": "myhub.azure-devices.net",
        "devices": [{"deviceId": d, "primaryKey": DEV_KEY} for d in DEVICES],
    }))
    return str(p)


def routes_file(tmp_path, routes, ttl=None):
    # No ttl: a negative time-to-live, which IoT Edge and edgehub read as "never expires".
    desired = {"schemaVersion": "1.1", "routes": routes,
               "storeAndForwardConfiguration": {"timeToLiveSecs": -1 if ttl is None else ttl}}
    p = tmp_path / "routes.json"
    p.write_text(json.dumps(desired))
    return str(p)


class Device:
    """A paho client with a SAS token; records which publishes were acknowledged
    and with which reason code."""

    def __init__(self, hub, device_id, version=mqtt.MQTTv311, key=DEV_KEY, expect_refusal=False):
        self.id = device_id
        self.version = version
        self.acked = {}  # mid -> reason code value
        self.payloads = {}  # mid -> payload
        self.lock = threading.Lock()
        self.closed = threading.Event()
        self.disconnect_rc = None
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=device_id,
                             protocol=version, reconnect_on_failure=False)
        self.c.username_pw_set(f"{GATEWAY}/{device_id}/?api-version=2021-04-12",
                               sas(f"{GATEWAY}/devices/{device_id}", key))
        self.c.tls_set(ca_certs=str(hub.ca))
        self.c.max_inflight_messages_set(20)
        connected = threading.Event()
        self.connack = None

        def on_connect(c, u, f, rc, p):
            self.connack = rc
            connected.set()
        self.c.on_connect = on_connect
        self.c.on_publish = self._on_publish
        self.c.on_disconnect = self._on_disconnect
        self.c.connect("localhost", hub.port("tls"), 30)
        self.c.loop_start()
        assert connected.wait(10), f"{device_id} got no CONNACK"
        if not expect_refusal:
            assert not self.connack.is_failure, f"{device_id} refused: {self.connack}"

    def _on_publish(self, c, u, mid, rc, p):
        with self.lock:
            self.acked[mid] = rc.value if hasattr(rc, "value") else rc

    def _on_disconnect(self, c, u, f, rc, p):
        self.disconnect_rc = rc
        self.closed.set()

    def send(self, payload, props="", qos=1):
        info = self.c.publish(f"devices/{self.id}/messages/events/{props}", payload, qos)
        with self.lock:
            self.payloads[info.mid] = payload
        return info

    def acknowledged(self, ok_only=True):
        with self.lock:
            return {self.payloads[m] for m, rc in self.acked.items() if not ok_only or rc == 0}

    def stop(self):
        self.c.disconnect()
        self.c.loop_stop()


def receiver(hub, identity, key, topic):
    """A device or module (`dev` or `dev/mod`) subscribed with QoS 1 to
    `topic`; returns the client and the list its messages arrive in."""
    got = []
    subscribed = threading.Event()
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=identity,
                    protocol=mqtt.MQTTv311, reconnect_on_failure=False)
    resource = "/modules/".join(identity.split("/"))
    c.username_pw_set(f"{GATEWAY}/{identity}/?api-version=2021-04-12",
                      sas(f"{GATEWAY}/devices/{resource}", key))
    c.tls_set(ca_certs=str(hub.ca))
    c.on_message = lambda cl, u, m: got.append(m)
    c.on_subscribe = lambda *a: subscribed.set()
    c.connect("localhost", hub.port("tls"), 30)
    c.loop_start()
    c.subscribe(topic, 1)
    assert subscribed.wait(5)
    return c, got


def property_bag(topic):
    return dict(kv.split("=", 1) for kv in topic.rsplit("/", 1)[1].split("&"))


def wait_for(cond, timeout=20, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def bodies(messages):
    return [base64.b64decode(m["body"]) for m in messages]


def test_telemetry_is_stored_with_its_identity_and_read_from_the_outbox(start_hub, tmp_path):
    hub = start_hub("--identities", identities(tmp_path), allow_anonymous=False)
    d = Device(hub, "dev1")
    info = d.send(b'{"t": 21}', "%24.ct=application%2Fjson&%24.ce=utf-8&%24.cdid=spoofed&unit=C")
    info.wait_for_publish(5)
    assert info.is_published()
    out = hub.outbox()
    assert bodies(out) == [b'{"t": 21}']
    m = out[0]
    assert m["properties"] == {"unit": "C"}
    sp = m["system_properties"]
    assert sp["connectionDeviceId"] == "dev1", "identity comes from authentication"
    assert sp["contentType"] == "application/json"
    assert sp["enqueuedTime"].startswith("20") and "edgeMessageId" in sp
    assert m["priority"] == 10 and m["expires_at_ms"] > time.time() * 1000
    # Reading does not remove; acknowledging does.
    assert len(hub.outbox()) == 1
    assert hub.ack_outbox(out) == 1
    assert hub.outbox() == []
    mt = hub.metrics()
    assert mt["edgehub_messages_received_total"] == 1
    assert mt["edgehub_messages_stored_total"] == 1
    assert mt["edgehub_messages_delivered_total"] == 1
    assert mt["edgehub_store_bytes"] == 0
    d.stop()


def test_management_api_needs_the_token(start_hub, tmp_path):
    import urllib.error
    import urllib.request
    hub = start_hub("--identities", identities(tmp_path), allow_anonymous=False)
    url = f"http://127.0.0.1:{hub.ports['management']}/api/outbox"
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5)
        assert e.value.code == 401
        assert "token" in json.loads(e.value.read())["error"]
    with pytest.raises(urllib.error.HTTPError) as e:
        hub.api("POST", "/api/outbox/ack", {"messages": [{"seq": 1, "priority": 11}]})
    assert e.value.code == 400


def test_stored_messages_survive_a_restart(start_hub, tmp_path):
    ids = identities(tmp_path)
    hub = start_hub("--identities", ids, allow_anonymous=False, name="h")
    d = Device(hub, "dev1")
    for i in range(50):
        d.send(f"m{i}".encode())
    wait_for(lambda: len(d.acknowledged()) == 50, what="50 PUBACKs")
    d.stop()
    assert hub.stop() == 0
    hub = start_hub("--identities", ids, allow_anonymous=False, name="h")
    assert bodies(hub.drain_outbox()) == [f"m{i}".encode() for i in range(50)]
    hub.stop()
    hub = start_hub("--identities", ids, allow_anonymous=False, name="h")
    assert hub.outbox() == [], "acknowledged outbox entries stay removed"


@pytest.mark.timeout(240)
def test_kill_9_under_load_loses_no_acknowledged_message(start_hub, tmp_path):
    """Several devices publish QoS 1 while the hub is killed with SIGKILL at
    random moments, three times; every message any device saw acknowledged
    must come out of the outbox afterwards (duplicates are allowed)."""
    ids = identities(tmp_path)
    rng = random.Random(7)
    acknowledged = set()
    sent_total = 0
    for rnd in range(5):
        hub = start_hub("--identities", ids, allow_anonymous=False, name="crash")
        devices = [Device(hub, d) for d in DEVICES]
        stop = threading.Event()

        def pump(dev, rnd=rnd):
            i = 0
            while not stop.is_set() and not dev.closed.is_set() and i < 3000:
                dev.send(f"{dev.id}-{rnd}-{i}".encode())
                i += 1
                if i % 20 == 0:
                    time.sleep(0.005)

        threads = [threading.Thread(target=pump, args=(d,)) for d in devices]
        for t in threads:
            t.start()
        # Kill once some messages were acknowledged, at a random point.
        wait_for(lambda: sum(len(d.acknowledged()) for d in devices) >= rng.randint(100, 1500),
                 what="some PUBACKs")
        hub.proc.send_signal(signal.SIGKILL)
        hub.proc.wait(10)
        stop.set()
        for t in threads:
            t.join(10)
        for d in devices:
            d.c.loop_stop()
            acknowledged |= d.acknowledged()
            sent_total += len(d.payloads)
        hub.stop()
    assert len(acknowledged) >= 150 and sent_total > len(acknowledged) / 2
    hub = start_hub("--identities", ids, allow_anonymous=False, name="crash")
    stored = set(bodies(hub.drain_outbox()))
    print(f"acknowledged {len(acknowledged)} of {sent_total} sent; outbox holds {len(stored)}")
    missing = acknowledged - stored
    assert not missing, f"{len(missing)} acknowledged messages lost, e.g. {sorted(missing)[:5]}"


def test_unrouted_messages_are_counted_acknowledged_and_dropped(start_hub, tmp_path):
    routes = routes_file(tmp_path, {"alerts": "FROM /messages/* WHERE alert = 'yes' INTO $upstream"})
    hub = start_hub("--identities", identities(tmp_path), "--routes", routes, allow_anonymous=False)
    d = Device(hub, "dev1")
    d.send(b"quiet").wait_for_publish(5)
    d.send(b"loud", "alert=yes").wait_for_publish(5)
    wait_for(lambda: len(d.acknowledged()) == 2, what="both PUBACKs")
    assert bodies(hub.outbox()) == [b"loud"]
    mt = hub.metrics()
    assert mt['edgehub_messages_dropped_total{reason="no_route"}'] == 1
    assert mt["edgehub_messages_stored_total"] == 1
    d.stop()


def test_route_priority_decides_outbox_order(start_hub, tmp_path):
    routes = routes_file(tmp_path, {
        "urgent": {"route": "FROM /messages/* WHERE alert = 'yes' INTO $upstream", "priority": 0},
        "rest": {"route": "FROM /messages/* WHERE NOT is_defined(alert) INTO $upstream", "priority": 5},
    })
    hub = start_hub("--identities", identities(tmp_path), "--routes", routes, allow_anonymous=False)
    d = Device(hub, "dev1")
    for body, props in [(b"a", ""), (b"b", ""), (b"ALERT", "alert=yes"), (b"c", "")]:
        d.send(body, props)
    wait_for(lambda: len(d.acknowledged()) == 4, what="4 PUBACKs")
    out = hub.outbox()
    assert bodies(out) == [b"ALERT", b"a", b"b", b"c"]
    assert [m["priority"] for m in out] == [0, 5, 5, 5]
    d.stop()


def test_expired_messages_are_removed_and_counted(start_hub, tmp_path):
    routes = routes_file(tmp_path, {"all": "FROM /messages/* INTO $upstream"}, ttl=1)
    hub = start_hub("--identities", identities(tmp_path), "--routes", routes, allow_anonymous=False)
    d = Device(hub, "dev1")
    d.send(b"short-lived").wait_for_publish(5)
    wait_for(lambda: hub.metrics()['edgehub_messages_dropped_total{reason="ttl_expiry"}'] == 1,
             what="the sweeper to remove the expired message")
    assert hub.outbox() == []
    assert hub.metrics()["edgehub_store_bytes"] == 0
    d.stop()


def test_qos2_telemetry_closes_the_connection_as_iot_hub_does(start_hub, tmp_path):
    hub = start_hub("--identities", identities(tmp_path), allow_anonymous=False)
    d = Device(hub, "dev1", version=mqtt.MQTTv5)
    d.send(b"x", qos=2)
    assert d.closed.wait(5)
    assert d.disconnect_rc.value == 0x9B  # QoS not supported
    assert hub.outbox() == []


def test_disk_budget_refuses_then_recovers_after_draining(start_hub, tmp_path):
    hub = start_hub("--identities", identities(tmp_path), "--store-max-bytes", "40KiB",
                    allow_anonymous=False)
    d5 = Device(hub, "dev1", version=mqtt.MQTTv5)
    body = b"x" * 1024
    accepted = 0
    refused = None
    for i in range(200):
        info = d5.send(body + str(i).encode())
        info.wait_for_publish(5)
        rc = d5.acked[info.mid]
        if rc == 0:
            accepted += 1
        else:
            refused = rc
            break
    assert refused == 0x97, "MQTT 5: PUBACK quota exceeded"
    assert 20 <= accepted < 40
    assert hub.metrics()['edgehub_messages_dropped_total{reason="quota_exceeded"}'] == 1

    # MQTT 3.1.1 has no negative PUBACK: the connection is closed.
    d3 = Device(hub, "dev2")
    d3.send(b"over budget" + body * 2)
    assert d3.closed.wait(5)
    assert "store is full" in hub.log()

    # Nothing stored was lost; once drained, messages are accepted again.
    stored = hub.drain_outbox()
    assert len(stored) == accepted
    info = d5.send(b"after drain")
    info.wait_for_publish(5)
    assert d5.acked[info.mid] == 0
    assert bodies(hub.outbox()) == [b"after drain"]
    d5.stop()


MOD_KEY = base64.b64encode(b"module-filter-key-0123456789abcd").decode()


def test_module_input_endpoint_delivers_in_order_after_the_module_subscribes(start_hub, tmp_path):
    ids = tmp_path / "ids.json"
    ids.write_text(json.dumps({"devices": [
        {"deviceId": "dev1", "primaryKey": DEV_KEY,
         "modules": [{"moduleId": "filter", "primaryKey": MOD_KEY}]}]}))
    endpoint = 'BrokeredEndpoint("/modules/filter/inputs/in1")'
    routes = routes_file(tmp_path, {
        "toFilter": f"FROM /messages/* WHERE NOT is_defined($connectionModuleId) INTO {endpoint}"})
    hub = start_hub("--identities", str(ids), "--routes", routes, allow_anonymous=False, name="m")
    d = Device(hub, "dev1")
    for i in range(30):
        d.send(f"r{i}".encode(), f"seq={i}")
    wait_for(lambda: len(d.acknowledged()) == 30, what="30 PUBACKs")
    # No module yet: everything waits in the endpoint's queue.
    assert len(hub.outbox(endpoint=endpoint)) == 30

    mod, got = receiver(hub, "dev1/filter", MOD_KEY, "devices/dev1/modules/filter/#")
    wait_for(lambda: len(got) >= 30, what="30 deliveries to the module")
    assert [m.payload for m in got[:30]] == [f"r{i}".encode() for i in range(30)], "in order"
    first = got[0]
    assert first.topic.startswith("devices/dev1/modules/filter/inputs/in1/")
    bag = property_bag(first.topic)
    assert bag["seq"] == "0" and bag["%24.cdid"] == "dev1"
    assert first.qos == 1
    # Acknowledged by the module (paho PUBACKs): gone from the store.
    wait_for(lambda: hub.outbox(endpoint=endpoint) == [], what="the queue to empty")
    # Live messages go straight through too.
    d.send(b"live")
    wait_for(lambda: any(m.payload == b"live" for m in got), what="a live delivery")
    mod.disconnect()
    mod.loop_stop()
    d.stop()


def test_retained_messages_survive_kill_9_with_their_properties(start_hub):
    from conftest import Client, props
    from paho.mqtt.packettypes import PacketTypes
    hub = start_hub(name="r")
    c = Client(hub, "retainer", version=5)
    c.connect()
    c.publish("plant/line1/state", b"running", qos=1, retain=True,
              properties=props(PacketTypes.PUBLISH, ContentType="text/plain",
                               UserProperty=[("site", "north")]))
    c.publish("plant/line2/state", b"stopped", qos=1, retain=True)
    c.publish("plant/line2/state", b"", qos=1, retain=True)  # cleared
    c.disconnect()
    hub.proc.send_signal(signal.SIGKILL)
    hub.proc.wait(10)
    hub.stop()
    hub = start_hub(name="r")
    s = Client(hub, "reader", version=5)
    s.connect()
    s.subscribe("plant/#", 1)
    m = s.get()
    assert (m.topic, m.payload, m.retain) == ("plant/line1/state", b"running", True)
    assert m.properties.ContentType == "text/plain"
    assert m.properties.UserProperty == [("site", "north")]
    s.assert_no_message()
    s.disconnect()


def test_identities_managed_through_the_api_persist_and_authenticate(start_hub):
    import urllib.error
    hub = start_hub(allow_anonymous=False, name="ids")
    created = hub.api("PUT", "/api/identities/api-dev", {"modules": [{"moduleId": "m1"}]})
    assert created["deviceId"] == "api-dev" and len(base64.b64decode(created["primaryKey"])) == 32
    cs = dict(kv.split("=", 1) for kv in created["connectionString"].split(";"))
    assert cs["DeviceId"] == "api-dev" and cs["GatewayHostName"] == GATEWAY
    assert created["modules"][0]["connectionString"].count("ModuleId=m1") == 1
    key = created["primaryKey"]

    d = Device(hub, "api-dev", key=key)
    d.send(b"hello").wait_for_publish(5)
    wait_for(lambda: len(d.acknowledged()) == 1, what="PUBACK")
    d.stop()

    # Bulk provisioning, as a load test does.
    bulk = hub.api("POST", "/api/identities", {"devices": [{"deviceId": f"bulk-{i}"} for i in range(50)]})
    assert len(bulk["devices"]) == 50
    assert len(hub.api("GET", "/api/identities")["devices"]) == 51

    # Invalid requests get specific errors.
    for path, body, needle in [("/api/identities/bad%20id", {}, "invalid device id"),
                               ("/api/identities/x", {"primaryKey": "not base64!"}, "not base64"),
                               ("/api/identities/x", {"deviceId": "y"}, "differs")]:
        with pytest.raises(urllib.error.HTTPError) as e:
            hub.api("PUT", path, body)
        assert e.value.code == 400 and needle in json.loads(e.value.read())["error"], path

    # The registry is in the store: it survives a restart without any file.
    hub.stop()
    hub = start_hub(allow_anonymous=False, name="ids")
    d = Device(hub, "api-dev", key=key)
    d.stop()
    assert hub.api("DELETE", "/api/identities/api-dev") is None  # 204 No Content
    refused = Device(hub, "api-dev", key=key, expect_refusal=True)
    assert refused.connack.is_failure
    with pytest.raises(urllib.error.HTTPError) as e:
        hub.api("DELETE", "/api/identities/api-dev")
    assert e.value.code == 404


def test_persistent_sessions_survive_kill_9_and_collect_messages_while_offline(start_hub):
    from conftest import Client, props
    from paho.mqtt.packettypes import PacketTypes
    hub = start_hub(name="s")
    sub = Client(hub, "keeper", version=3, clean=False)
    sub.connect()
    sub.subscribe("alerts/#", 1)
    short = Client(hub, "short-lived", version=5, clean=True,
                   connect_props=props(PacketTypes.CONNECT, SessionExpiryInterval=1))
    short.connect()
    short.subscribe("alerts/#", 1)
    sub.disconnect()
    short.disconnect()
    hub.proc.send_signal(signal.SIGKILL)
    hub.proc.wait(10)
    hub.stop()
    time.sleep(1.5)  # longer than short-lived's session expiry

    hub = start_hub(name="s")
    pub = Client(hub, "pub", version=5)
    pub.connect()
    pub.publish("alerts/boiler", b"overheat", qos=1)
    pub.disconnect()
    sub = Client(hub, "keeper", version=3, clean=False)
    _, flags, _ = sub.connect()
    assert flags.session_present, "the session and its subscription came back"
    m = sub.get()
    assert (m.topic, m.payload) == ("alerts/boiler", b"overheat")
    sub.disconnect()
    short = Client(hub, "short-lived", version=5, clean=False,
                   connect_props=props(PacketTypes.CONNECT, SessionExpiryInterval=60))
    _, flags, _ = short.connect()
    assert not flags.session_present, "an expired session stays expired across restarts"
    short.disconnect()


def test_cloud_to_device_messages_are_stored_until_the_device_takes_them(start_hub, tmp_path):
    import urllib.error
    hub = start_hub("--identities", identities(tmp_path), allow_anonymous=False, name="c2d")
    # Sent while the device is away: stored, 202 with its sequence number.
    r = hub.api("POST", "/api/devices/dev1/messages",
                {"body": "reboot", "properties": {"urgency": "high"}, "messageId": "c2d-1"})
    assert r["seq"] > 0
    hub.api("POST", "/api/devices/dev1/messages", {"bodyBase64": base64.b64encode(b"\x00\x01").decode()})
    assert len(hub.outbox(endpoint="c2d:dev1")) == 2
    with pytest.raises(urllib.error.HTTPError) as e:
        hub.api("POST", "/api/devices/nobody/messages", {"body": "x"})
    assert e.value.code == 404

    d, got = receiver(hub, "dev1", DEV_KEY, "devices/dev1/messages/devicebound/#")
    wait_for(lambda: len(got) == 2, what="both C2D messages")
    assert [m.payload for m in got] == [b"reboot", b"\x00\x01"]
    topic = got[0].topic
    assert topic.startswith("devices/dev1/messages/devicebound/")
    bag = property_bag(topic)
    assert bag["urgency"] == "high" and bag["%24.mid"] == "c2d-1"
    assert bag["%24.to"] == "%2Fdevices%2Fdev1%2Fmessages%2FdeviceBound"
    wait_for(lambda: hub.outbox(endpoint="c2d:dev1") == [], what="the C2D queue to empty")
    # While connected, new messages go straight through.
    hub.api("POST", "/api/devices/dev1/messages", {"body": "live"})
    wait_for(lambda: len(got) == 3 and got[2].payload == b"live", what="a live C2D message")
    d.disconnect()
    d.loop_stop()


def test_messages_queued_for_persistent_sessions_survive_kill_9(start_hub):
    """QoS 1/2 messages for a persistent subscriber are recorded before the
    publisher's PUBACK: a crash while the subscriber is away, or before it
    acknowledged them, loses none; delivered ones leave the store."""
    from conftest import Client, props
    from paho.mqtt.packettypes import PacketTypes
    hub = start_hub(name="q")
    away = Client(hub, "away", version=3, clean=False)
    away.connect()
    away.subscribe("jobs/#", 1)
    away.disconnect()
    v5 = Client(hub, "v5-away", version=5, clean=True,
                connect_props=props(PacketTypes.CONNECT, SessionExpiryInterval=3600))
    v5.connect()
    v5.subscribe("jobs/#", 2)
    v5.disconnect()
    clean = Client(hub, "clean", version=3, clean=True)
    clean.connect()
    clean.subscribe("jobs/#", 1)
    pub = Client(hub, "pub", version=5)
    pub.connect()
    for i in range(20):
        pub.publish(f"jobs/{i % 3}", f"job-{i}".encode(), qos=1 if i % 2 else 2)
    assert [m.payload for m in clean.drain(20)] == [f"job-{i}".encode() for i in range(20)]
    assert hub.metrics()["edgehub_session_queue_length"] == 40, "20 for each persistent session"
    hub.proc.send_signal(signal.SIGKILL)
    hub.proc.wait(10)
    hub.stop()

    hub = start_hub(name="q")
    back = Client(hub, "away", version=3, clean=False)
    _, flags, _ = back.connect()
    assert flags.session_present
    got = back.drain(20)
    assert [m.payload for m in got] == [f"job-{i}".encode() for i in range(20)], "all, in order"
    assert {m.qos for m in got} == {1}, "at the subscription's QoS"
    back.assert_no_message(0.3)
    back.disconnect()
    v5 = Client(hub, "v5-away", version=5, clean=False,
                connect_props=props(PacketTypes.CONNECT, SessionExpiryInterval=3600))
    v5.connect()
    got = v5.drain(20)
    # paho hands a QoS 2 message to the application only after PUBREL, so
    # the two QoS levels interleave differently there; each keeps its order.
    for q in (1, 2):
        assert [m.payload for m in got if m.qos == q] == [
            f"job-{i}".encode() for i in range(20) if (1 if i % 2 else 2) == q]
    v5.disconnect()
    # Acknowledged by the subscribers: nothing left in the store, and a
    # second restart brings nothing back.
    wait_for(lambda: hub.metrics()["edgehub_session_queue_length"] == 0, what="records removed")
    hub.stop()
    hub = start_hub(name="q")
    again = Client(hub, "away", version=3, clean=False)
    again.connect()
    again.assert_no_message(0.5)
    again.disconnect()
