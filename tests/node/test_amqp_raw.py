"""The AMQP head against rhea, an independent AMQP 1.0 client (raw_amqp.js),
for what the SDK never does: SASL PLAIN, CBS with bad, expired and foreign
tokens, two identities on one connection, another identity's address, an
unknown address, an oversized message, link credit; and malformed frames from
a bare TLS socket."""

import base64
import hashlib
import hmac
import json
import os
import queue
import socket
import ssl
import subprocess
import threading
import time
import urllib.parse
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
GATEWAY = "edgehub-test"  # the harness passes --hostname edgehub-test
KEYS = {
    "dev1": base64.b64encode(b"raw-amqp-device-one-key-01234567").decode(),
    "dev2": base64.b64encode(b"raw-amqp-device-two-key-01234567").decode(),
}


def token(resource, key, ttl=3600):
    expiry = int(time.time()) + ttl
    sr = urllib.parse.quote(resource, safe="")
    mac = hmac.new(base64.b64decode(key), f"{sr}\n{expiry}".encode(), hashlib.sha256).digest()
    return f"SharedAccessSignature sr={sr}&sig={urllib.parse.quote(base64.b64encode(mac), safe='')}&se={expiry}"


def audience(device):
    return f"{GATEWAY}/devices/{device}"


@pytest.fixture
def hub(start_hub, tmp_path):
    ids = tmp_path / "identities.json"
    ids.write_text(json.dumps({"devices": [{"deviceId": d, "primaryKey": k} for d, k in KEYS.items()]}))
    return start_hub("--identities", str(ids), allow_anonymous=False)


class Raw:
    """raw_amqp.js on one connection."""

    def __init__(self, hub):
        d = os.environ.get("EDGEHUB_NODE_MODULES")
        if not d or not Path(d, "rhea").is_dir():
            pytest.fail("EDGEHUB_NODE_MODULES must name the npm-installed tests/node packages (scripts/test does)")
        env = dict(os.environ, EDGEHUB_CA=str(hub.ca), EDGEHUB_AMQPS_PORT=str(hub.ports["amqps"]), NODE_PATH=d)
        self.proc = subprocess.Popen(["node", str(HERE / "raw_amqp.js")], env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.events: "queue.Queue[dict]" = queue.Queue()
        threading.Thread(target=lambda: [self.events.put(json.loads(l)) for l in self.proc.stdout],
                         daemon=True).start()

    def do(self, op, **args):
        self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.proc.stdin.flush()

    def next(self, key, timeout=10, where=None):
        deadline = time.time() + timeout
        while True:
            try:
                e = self.events.get(timeout=max(0.05, deadline - time.time()))
            except queue.Empty:
                raise AssertionError(f"no {key!r} event within {timeout} s")
            if "error" in e and "op" not in e and e.get("error") in ("connect", "send", "sender", "receiver"):
                raise AssertionError(f"client failed: {e}")
            if key in e and (where is None or where(e)):
                return e

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def raw(hub):
    clients = []

    def start():
        c = Raw(hub)
        clients.append(c)
        return c

    yield start
    for c in clients:
        c.close()


def cbs(c, device, tok, mid):
    """A put-token; returns the reply's status code."""
    c.do("putToken", audience=audience(device), token=tok, id=mid)
    reply = c.next("message", where=lambda e: e["message"] == "cbsReplies" and e["correlationId"] == mid)
    return reply["properties"]["status-code"]


def open_cbs(c):
    c.do("connect")
    c.next("open")
    c.do("sender", name="cbs", address="$cbs")
    c.do("receiver", name="cbsReplies", address="$cbs")
    c.next("attached", where=lambda e: e["attached"] == "cbs")
    c.next("attached", where=lambda e: e["attached"] == "cbsReplies")


def telemetry_link(raw):
    """A connection that proved dev1 over CBS, with its telemetry sender "t"."""
    c = raw()
    open_cbs(c)
    assert cbs(c, "dev1", token(audience("dev1"), KEYS["dev1"]), "t1") == 200
    c.do("sender", name="t", address="/devices/dev1/messages/events")
    c.next("attached", where=lambda e: e["attached"] == "t")
    return c


def detached(c, name):
    return c.next("detached", where=lambda e: e["detached"] == name)["error"]


def test_sasl_plain_with_a_sas_token_sends_telemetry(hub, raw):
    c = raw()
    c.do("connect", username=f"dev1@sas.{GATEWAY}", password=token(audience("dev1"), KEYS["dev1"]))
    c.next("open")
    c.do("sender", name="t", address="/devices/dev1/messages/events")
    c.next("attached")
    c.do("send", name="t", body="plain", id="p-1", properties={"kind": "raw"}, tag="1")
    assert c.next("settled")["state"] == "accepted"
    [m] = hub.outbox()
    assert base64.b64decode(m["body"]) == b"plain"
    assert m["properties"] == {"kind": "raw"}
    assert m["system_properties"]["connectionDeviceId"] == "dev1"


def test_sasl_plain_with_a_bad_token_is_refused(hub, raw):
    c = raw()
    c.do("connect", username=f"dev1@sas.{GATEWAY}", password=token(audience("dev1"), KEYS["dev2"]))
    c.next("disconnected")
    assert hub.outbox() == []


def test_cbs_refuses_bad_expired_and_foreign_tokens_and_links_stay_closed(hub, raw):
    c = raw()
    open_cbs(c)
    assert cbs(c, "dev1", "SharedAccessSignature sr=x&sig=y", "bad") == 401
    assert cbs(c, "dev1", token(audience("dev1"), KEYS["dev1"], ttl=-600), "expired") == 401
    # dev2's own valid token, offered for dev1.
    assert cbs(c, "dev1", token(audience("dev2"), KEYS["dev2"]), "foreign") == 401
    c.do("sender", name="t", address="/devices/dev1/messages/events")
    assert detached(c, "t")["condition"] == "amqp:unauthorized-access"
    assert hub.outbox() == []


def test_two_identities_share_one_connection_each_on_its_own_address(hub, raw):
    c = raw()
    open_cbs(c)
    assert cbs(c, "dev1", token(audience("dev1"), KEYS["dev1"]), "t1") == 200
    assert cbs(c, "dev2", token(audience("dev2"), KEYS["dev2"]), "t2") == 200
    for d in ("dev1", "dev2"):
        c.do("sender", name=d, address=f"/devices/{d}/messages/events")
        c.next("attached", where=lambda e, d=d: e["attached"] == d)
        c.do("send", name=d, body=f"from {d}", tag=d)
        assert c.next("settled", where=lambda e, d=d: e["settled"] == d)["state"] == "accepted"
    sent_by = sorted((m["system_properties"]["connectionDeviceId"], base64.b64decode(m["body"]).decode())
                     for m in hub.outbox())
    assert sent_by == [("dev1", "from dev1"), ("dev2", "from dev2")]


def test_another_identitys_address_and_unknown_addresses_are_refused(hub, raw):
    c = raw()
    open_cbs(c)
    assert cbs(c, "dev1", token(audience("dev1"), KEYS["dev1"]), "t1") == 200
    c.do("sender", name="foreign", address="/devices/dev2/messages/events")
    assert detached(c, "foreign")["condition"] == "amqp:unauthorized-access"
    c.do("receiver", name="foreignC2d", address="/devices/dev2/messages/deviceBound")
    assert detached(c, "foreignC2d")["condition"] == "amqp:unauthorized-access"
    c.do("sender", name="nowhere", address="/queues/orders")
    assert detached(c, "nowhere")["condition"] == "amqp:not-found"
    # The connection itself is fine: its own address still works.
    c.do("sender", name="own", address="/devices/dev1/messages/events")
    c.next("attached", where=lambda e: e["attached"] == "own")


def test_an_oversized_message_is_refused_and_nothing_is_stored(hub, raw):
    c = telemetry_link(raw)
    c.do("send", name="t", bodyBytes=300 * 1024, tag="big")
    # Refused either as the delivery's outcome or by detaching the link.
    deadline = time.time() + 10
    verdict = None
    while verdict is None and time.time() < deadline:
        ev = c.events.get(timeout=max(0.05, deadline - time.time()))
        if ev.get("settled") == "big":
            verdict = ("rejected", ev.get("condition"))
            assert ev["state"] == "rejected", ev
        elif ev.get("detached") == "t":
            verdict = ("detached", (ev.get("error") or {}).get("condition"))
    assert verdict is not None and verdict[1] == "amqp:link:message-size-exceeded", verdict
    assert hub.outbox() == []


def test_cloud_to_device_respects_link_credit(hub, raw):
    c = raw()
    open_cbs(c)
    assert cbs(c, "dev1", token(audience("dev1"), KEYS["dev1"]), "t1") == 200
    c.do("receiver", name="c2d", address="/devices/dev1/messages/deviceBound", credit=0)
    c.next("attached", where=lambda e: e["attached"] == "c2d")
    for i in range(2):
        hub.api("POST", "/api/devices/dev1/messages", {"body": f"m{i}"})
    time.sleep(1)
    with pytest.raises(AssertionError):
        c.next("message", timeout=1, where=lambda e: e["message"] == "c2d")
    c.do("flow", name="c2d", credit=1)
    first = c.next("message", where=lambda e: e["message"] == "c2d")
    assert first["body"] == "m0"
    assert first["annotations"].get("iothub-deliverycount") == 0
    with pytest.raises(AssertionError):
        c.next("message", timeout=1, where=lambda e: e["message"] == "c2d")
    c.do("accept", key=first["key"])
    c.do("flow", name="c2d", credit=1)
    assert c.next("message", where=lambda e: e["message"] == "c2d")["body"] == "m1"


@pytest.mark.parametrize("garbage", [
    b"AMQP\x00\x01\x00\x00" + b"\x00\x00\x00\x10\x02\x00\x00\x00\xff\xff\xff\xff\xff\xff\xff\xff",
    b"AMQP\x00\x01\x00\x00" + b"\x00\x00\x00\x04\x02\x00\x00\x00",
    b"AMQP\x00\x01\x00\x00" + b"\x7f\xff\xff\xff\x02\x00\x00\x00",
    b"AMQP\x03\x01\x00\x00" + b"\x00\x00\x00\x09\x02\x01\x00\x00\x41",
    b"HTTP/1.1 200 OK\r\n\r\n",
], ids=["undecodable-body", "frame-under-header-size", "frame-over-maximum", "bad-sasl-frame", "not-amqp"])
def test_malformed_input_closes_only_that_connection(hub, raw, garbage):
    ctx = ssl.create_default_context(cafile=str(hub.ca))
    with socket.create_connection(("127.0.0.1", hub.ports["amqps"]), timeout=10) as tcp:
        with ctx.wrap_socket(tcp, server_hostname="localhost") as s:
            s.sendall(garbage)
            s.settimeout(10)
            closed = False
            data = b""
            try:
                while chunk := s.recv(4096):
                    data += chunk
                closed = True
            except (ssl.SSLError, ConnectionResetError):
                closed = True
            except socket.timeout:
                pass
    assert closed, "the hub closes a connection that sends malformed input"
    if garbage.startswith(b"AMQP\x00"):
        # A broken frame after the AMQP header is answered with a Close.
        assert b"amqp:decode-error" in data, data
    assert hub.proc.poll() is None, "the hub is still running"
    # And a well-behaved client is served right after.
    c = raw()
    open_cbs(c)
    assert cbs(c, "dev1", token(audience("dev1"), KEYS["dev1"]), "after") == 200


def test_links_close_when_the_token_expires_and_a_renewed_token_extends_them(hub, raw):
    c = raw()
    open_cbs(c)
    # Valid for the clock-skew allowance only: about 6 s from now.
    short = token(audience("dev1"), KEYS["dev1"], ttl=-294)
    assert cbs(c, "dev1", short, "short") == 200
    c.do("sender", name="t", address="/devices/dev1/messages/events")
    c.next("attached", where=lambda e: e["attached"] == "t")
    err = c.next("detached", timeout=20, where=lambda e: e["detached"] == "t")["error"]
    assert err["condition"] == "amqp:unauthorized-access", err
    # A second identity's link is renewed in time and stays.
    assert cbs(c, "dev2", token(audience("dev2"), KEYS["dev2"], ttl=-294), "short2") == 200
    c.do("sender", name="t2", address="/devices/dev2/messages/events")
    c.next("attached", where=lambda e: e["attached"] == "t2")
    assert cbs(c, "dev2", token(audience("dev2"), KEYS["dev2"]), "renewed") == 200
    with pytest.raises(AssertionError):
        c.next("detached", timeout=10, where=lambda e: e["detached"] == "t2")
    c.do("send", name="t2", body="still here", tag="late")
    assert c.next("settled", where=lambda e: e["settled"] == "late")["state"] == "accepted"


def test_a_batch_is_split_into_its_messages_each_routed(hub, raw):
    c = telemetry_link(raw)
    c.do("sendBatch", name="t", bodies=["one", "two", "three"], tag="b1")
    assert c.next("settled", where=lambda e: e["settled"] == "b1")["state"] == "accepted"
    out = hub.outbox()
    assert [base64.b64decode(m["body"]) for m in out] == [b"one", b"two", b"three"]
    assert [m["properties"] for m in out] == [{"part": "0"}, {"part": "1"}, {"part": "2"}]
    assert [m["system_properties"]["messageId"] for m in out] == ["b1-0", "b1-1", "b1-2"]
    assert all(m["system_properties"]["connectionDeviceId"] == "dev1" for m in out)


def test_an_x509_device_is_authenticated_by_its_tls_client_certificate(hub, raw, tmp_path):
    import importlib.util
    spec = importlib.util.spec_from_file_location("certs", HERE.parent / "python" / "certs.py")
    certs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(certs)
    cert, key = certs.make_cert("x1")
    cert_path, key_path = certs.write(tmp_path, "x1", cert, key)
    hub.api("PUT", "/devices/x1", {"authentication": {
        "type": "selfSigned", "x509Thumbprint": {"primaryThumbprint": certs.thumbprint(cert)}}})
    c = raw()
    c.do("connect", cert=str(cert_path), key=str(key_path))
    c.next("open")
    c.do("sender", name="x", address="/devices/x1/messages/events")
    c.next("attached", where=lambda e: e["attached"] == "x")
    c.do("send", name="x", body="by certificate", tag="x-1")
    assert c.next("settled", where=lambda e: e["settled"] == "x-1")["state"] == "accepted"
    [m] = hub.outbox()
    assert m["system_properties"]["connectionDeviceId"] == "x1"
    # The certificate proves x1, not a key device.
    c.do("sender", name="other", address="/devices/dev1/messages/events")
    assert detached(c, "other")["condition"] == "amqp:unauthorized-access"


def test_an_idle_timeout_under_five_seconds_is_refused(hub, raw):
    plain = dict(username=f"dev1@sas.{GATEWAY}", password=token(audience("dev1"), KEYS["dev1"]))
    c = raw()
    c.do("connect", idleTimeout=1000, **plain)
    assert c.next("connectionError")["connectionError"] == "amqp:invalid-field"
    assert "idle-time-out 1000 ms is under the 5000 ms" in hub.log()
    # Five seconds is enough, and the connection works.
    c = raw()
    c.do("connect", idleTimeout=5000, **plain)
    c.next("open")
    c.do("sender", name="t", address="/devices/dev1/messages/events")
    c.next("attached")
    c.do("send", name="t", body="ok", tag="1")
    assert c.next("settled")["state"] == "accepted"
