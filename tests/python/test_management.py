"""The management API in IoT Hub's service shapes: devices and modules with
their `authentication`, and deployments whose routes apply without dropping
connections and survive restarts."""

import json
import signal
import urllib.error

import pytest

from conftest import Client
from test_iothub_auth import GATEWAY, sas
from test_store import bodies, wait_for


def status_of(hub, method, path, body=None):
    try:
        return 200, hub.api(method, path, body)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def connect(hub, identity, key):
    resource = "/modules/".join(identity.split("/"))
    c = Client(hub, identity, version=5, transport="tls",
               username=f"{GATEWAY}/{identity}/?api-version=2021-04-12",
               password=sas(f"{GATEWAY}/devices/{resource}", key))
    c.connect()
    return c


def test_devices_and_modules_crud_in_iothub_shape(start_hub):
    hub = start_hub(allow_anonymous=False)
    d = hub.api("PUT", "/devices/Sensor-1", {"deviceId": "Sensor-1", "status": "enabled",
                                             "authentication": {"type": "sas"}})
    assert d["deviceId"] == "Sensor-1" and d["authentication"]["type"] == "sas"
    keys = d["authentication"]["symmetricKey"]
    assert keys["primaryKey"] and keys["secondaryKey"] and keys["primaryKey"] != keys["secondaryKey"]
    m = hub.api("PUT", "/devices/sensor-1/modules/filter", {})
    assert m["moduleId"] == "filter" and m["deviceId"] == "Sensor-1"
    assert "ModuleId=filter" in m["connectionString"]
    assert [x["moduleId"] for x in hub.api("GET", "/devices/sensor-1/modules")] == ["filter"]

    # Both keys work; ids compare case-insensitively.
    connect(hub, "Sensor-1", keys["secondaryKey"]).disconnect()
    connect(hub, "Sensor-1/filter", m["authentication"]["symmetricKey"]["primaryKey"]).disconnect()

    # Replacing the device's keys keeps its modules.
    hub.api("PUT", "/devices/Sensor-1", {"authentication": {"type": "sas", "symmetricKey": {
        "primaryKey": keys["secondaryKey"], "secondaryKey": keys["primaryKey"]}}})
    assert [x["moduleId"] for x in hub.api("GET", "/devices/Sensor-1/modules")] == ["filter"]
    assert [x["deviceId"] for x in hub.api("GET", "/devices")] == ["Sensor-1"]

    # Errors: the right status and a message.
    assert status_of(hub, "GET", "/devices/nope")[0] == 404
    code, err = status_of(hub, "PUT", "/devices/Sensor-1", {"deviceId": "other"})
    assert code == 400 and "differs from the URL" in err["error"]
    code, err = status_of(hub, "PUT", "/devices/bad%2Fid", {})
    assert code == 400 and "invalid device id" in err["error"]

    assert status_of(hub, "DELETE", "/devices/Sensor-1/modules/filter")[0] == 200
    assert status_of(hub, "DELETE", "/devices/Sensor-1/modules/filter")[0] == 404
    assert status_of(hub, "DELETE", "/devices/Sensor-1")[0] == 200
    assert status_of(hub, "GET", "/devices/Sensor-1")[0] == 404
    assert hub.api("GET", "/devices") == []


def manifest(routes, ttl=7200):
    return {"modulesContent": {
        "$edgeAgent": {"properties.desired": {"schemaVersion": "1.1", "modules": {}}},
        "$edgeHub": {"properties.desired": {
            "schemaVersion": "1.1", "routes": routes,
            "storeAndForwardConfiguration": {"timeToLiveSecs": ttl}}}}}


def test_deployment_routes_apply_live_and_survive_restarts(start_hub):
    hub = start_hub(allow_anonymous=False)
    key = hub.api("PUT", "/devices/d1", {})["authentication"]["symmetricKey"]["primaryKey"]
    code, err = status_of(hub, "GET", "/deployment")
    assert code == 404 and "default route" in err["error"]

    dev = connect(hub, "d1", key)
    dev.publish("devices/d1/messages/events/kind=a", b"before", qos=1)
    # Only kind=b goes upstream from now on; the device stays connected.
    code, applied = status_of(hub, "PUT", "/deployment",
                              manifest({"onlyB": "FROM /messages/* WHERE kind = 'b' INTO $upstream"}))
    assert code == 200 and applied["routes"][0]["name"] == "onlyB"
    dev.publish("devices/d1/messages/events/kind=a", b"dropped", qos=1)
    dev.publish("devices/d1/messages/events/kind=b", b"kept", qos=1)
    assert dev.disconnects.empty(), "applying a deployment drops no connection"
    assert bodies(hub.outbox()) == [b"before", b"kept"]

    # An invalid manifest is refused with a positioned error; nothing changes.
    code, err = status_of(hub, "PUT", "/deployment", manifest({"bad": "FROM /messages/* WHERE INTO $upstream"}))
    assert code == 400 and "1:" in err["error"]
    code, err = status_of(hub, "PUT", "/deployment", {"modulesContent": {"$edgeHub": {"properties.desired": {}}}})
    assert code == 400 and "schemaVersion is missing" in err["error"]
    no_routes = manifest({})
    del no_routes["modulesContent"]["$edgeHub"]["properties.desired"]["routes"]
    code, err = status_of(hub, "PUT", "/deployment", no_routes)
    assert code == 400 and "routes" in err["error"]
    assert hub.api("GET", "/deployment")["modulesContent"]["$edgeHub"]["properties.desired"]["routes"] == \
        {"onlyB": "FROM /messages/* WHERE kind = 'b' INTO $upstream"}
    dev.disconnect()

    hub.stop(signal.SIGKILL)
    hub = start_hub(allow_anonymous=False)
    dev = connect(hub, "d1", key)
    dev.publish("devices/d1/messages/events/kind=a", b"still dropped", qos=1)
    dev.publish("devices/d1/messages/events/kind=b", b"after restart", qos=1)
    wait_for(lambda: len(hub.outbox()) == 3, what="three stored messages")
    assert bodies(hub.outbox()) == [b"before", b"kept", b"after restart"]
    dev.disconnect()


def test_deleting_a_device_closes_its_connection(start_hub):
    hub = start_hub(allow_anonymous=False)
    d = hub.api("PUT", "/devices/gone", {})
    key = d["authentication"]["symmetricKey"]["primaryKey"]
    m = hub.api("PUT", "/devices/gone/modules/mod", {})
    dev = connect(hub, "gone", key)
    mod = connect(hub, "gone/mod", m["authentication"]["symmetricKey"]["primaryKey"])
    hub.api("POST", "/devices/gone/messages/deviceBound", {"body": "never collected"})
    assert len(hub.outbox(endpoint="c2d:gone")) == 1
    hub.api("DELETE", "/devices/gone")
    assert hub.outbox(endpoint="c2d:gone") == [], "its cloud-to-device queue goes with it"
    for c in (dev, mod):
        rc, props = c.disconnects.get(timeout=5)
        assert rc.value == 0x87 and "deleted" in props.ReasonString
        c.c.loop_stop()
    again = Client(hub, "gone", version=5, transport="tls",
                   username=f"{GATEWAY}/gone/?api-version=2021-04-12",
                   password=sas(f"{GATEWAY}/devices/gone", key))
    rc, _, _ = again.connect(expect_success=False)
    assert rc.value == 0x87


def test_cloud_to_device_queue_is_bounded_per_device(start_hub):
    hub = start_hub(allow_anonymous=False)
    hub.api("PUT", "/devices/sleepy", {})
    for i in range(50):
        hub.api("POST", "/devices/sleepy/messages/deviceBound", {"body": f"m{i}"})
    code, err = status_of(hub, "POST", "/devices/sleepy/messages/deviceBound", {"body": "one too many"})
    assert code == 403 and "DeviceMaximumQueueDepthExceeded" in err["error"]
    assert len(hub.outbox(endpoint="c2d:sleepy")) == 50
