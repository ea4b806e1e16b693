"""Harness: starts the real `edgehub` binary on ephemeral loopback ports and
drives it with paho-mqtt, an independent MQTT 3.1.1 / 5.0 client."""

import json
import os
import queue
import signal
import socket
import ssl
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

REPO = Path(__file__).resolve().parents[2]


def _binary() -> str:
    if os.environ.get("EDGEHUB_BIN"):
        return os.environ["EDGEHUB_BIN"]
    subprocess.run(["cargo", "build", "-q", "-p", "edgehub", "--bin", "edgehub"], cwd=REPO, check=True)
    meta = json.loads(
        subprocess.run(
            ["cargo", "metadata", "--format-version", "1", "--no-deps"],
            cwd=REPO, check=True, capture_output=True, text=True,
        ).stdout
    )
    return str(Path(meta["target_directory"]) / "debug" / "edgehub")


@pytest.fixture(scope="session")
def binary():
    return _binary()


class Hub:
    """One edgehub process with plain and TLS listeners on 127.0.0.1:0."""

    def __init__(self, binary, data_dir: Path, *args, allow_anonymous=True, mqtts="127.0.0.1:0",
                 amqps="127.0.0.1:0", wss="127.0.0.1:0", quic="127.0.0.1:0"):
        self.data_dir = data_dir
        self.ca = data_dir / "ca.pem"
        cmd = [
            binary, "--data-dir", str(data_dir),
            "--mqtt-listen", "127.0.0.1:0", "--mqtts-listen", mqtts, "--amqps-listen", amqps,
            "--wss-listen", wss, "--quic-listen", quic,
            "--management-listen", "127.0.0.1:0", "--store-min-free-disk", "0",
            "--hostname", "edgehub-test", "--log", "edgehub=debug,info",
        ]
        if allow_anonymous:
            cmd.append("--allow-anonymous")
        cmd += list(args)
        self.log_path = data_dir.parent / f"{data_dir.name}.log"
        data_dir.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._log, text=True)
        lines: "queue.Queue[str]" = queue.Queue()

        def pump():
            for line in self.proc.stdout:
                lines.put(line)

        threading.Thread(target=pump, daemon=True).start()
        self.ports = {}
        deadline = time.time() + 30
        while True:
            try:
                line = lines.get(timeout=max(0.1, deadline - time.time()))
            except queue.Empty:
                self.stop()
                raise RuntimeError(f"edgehub did not start; log: {self.log_path.read_text()}")
            parts = line.split()
            if parts == ["ready"]:
                break
            if len(parts) == 3 and parts[0] == "listening":
                self.ports[parts[1]] = int(parts[2].rsplit(":", 1)[1])

    def port(self, transport):
        return self.ports[{"tls": "mqtts", "tcp": "mqtt"}.get(transport, transport)]

    # The management API (HTTP on loopback).
    def api(self, method, path, body=None):
        token = (self.data_dir / "management-token").read_text().strip()
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.ports['management']}{path}", method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            body = r.read()
            return json.loads(body) if body else None

    def outbox(self, max=1000, endpoint="$upstream"):
        q = urllib.parse.urlencode({"endpoint": endpoint, "max": max})
        return self.api("GET", f"/api/outbox?{q}")["messages"]

    def ack_outbox(self, messages, endpoint="$upstream"):
        q = urllib.parse.urlencode({"endpoint": endpoint})
        body = {"messages": [{"seq": m["seq"], "priority": m["priority"]} for m in messages]}
        return self.api("POST", f"/api/outbox/ack?{q}", body)["acknowledged"]

    def drain_outbox(self, endpoint="$upstream"):
        """Every message in the outbox, removing them."""
        out = []
        while True:
            batch = self.outbox(1000, endpoint)
            if not batch:
                return out
            out += batch
            assert self.ack_outbox(batch, endpoint) == len(batch)

    def metrics(self):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.ports['management']}/metrics", timeout=10) as r:
            text = r.read().decode()
        values = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                values[name] = float(value)
        return values

    def log(self):
        return self.log_path.read_text()

    def stop(self, sig=signal.SIGTERM):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


@pytest.fixture
def start_hub(binary, tmp_path):
    hubs = []

    def start(*args, allow_anonymous=True, name="hub", **listeners):
        h = Hub(binary, tmp_path / name, *args, allow_anonymous=allow_anonymous, **listeners)
        hubs.append(h)
        return h

    yield start
    for h in hubs:
        h.stop()


@pytest.fixture
def hub(start_hub):
    return start_hub()


def props(kind, **kv):
    p = Properties(kind)
    for k, v in kv.items():
        setattr(p, k, v)
    return p


class Client:
    """A paho client made synchronous: each call waits for its acknowledgement."""

    def __init__(self, hub, client_id="", version=5, transport="tcp", clean=True,
                 keepalive=30, connect_props=None, will=None, username=None,
                 password=None, tls_context=None):
        self.version = version
        proto = mqtt.MQTTv5 if version == 5 else mqtt.MQTTv311
        kw = {} if version == 5 else {"clean_session": clean}
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                             protocol=proto, reconnect_on_failure=False,
                             transport="websockets" if transport in ("ws", "wss") else "tcp", **kw)
        if transport in ("ws", "wss"):
            self.c.ws_set_options(path="/$iothub/websocket")
        self.hub, self.transport, self.clean = hub, transport, clean
        self.keepalive, self.connect_props = keepalive, connect_props
        self.messages = queue.Queue()
        self.connacks = queue.Queue()
        self.disconnects = queue.Queue()
        self.subacks = queue.Queue()
        self.unsubacks = queue.Queue()
        self.pubacks = {}
        self.c.on_connect = lambda c, u, f, rc, p: self.connacks.put((rc, f, p))
        self.c.on_message = lambda c, u, m: self.messages.put(m)
        self.c.on_disconnect = lambda c, u, f, rc, p: self.disconnects.put((rc, p))
        self.c.on_subscribe = lambda c, u, mid, rcs, p: self.subacks.put((mid, rcs))
        self.c.on_unsubscribe = lambda c, u, mid, rcs, p: self.unsubacks.put((mid, rcs))
        if username is not None:
            self.c.username_pw_set(username, password)
        if will:
            self.c.will_set(**will)
        if transport in ("tls", "wss"):
            if tls_context is not None:
                self.c.tls_set_context(tls_context)
            else:
                self.c.tls_set(ca_certs=str(hub.ca))

    def connect(self, expect_success=True, timeout=10):
        kw = {"clean_start": self.clean} if self.version == 5 else {}
        if self.connect_props is not None:
            kw["properties"] = self.connect_props
        self.c.connect("localhost", self.hub.port(self.transport), self.keepalive, **kw)
        self.c.loop_start()
        rc, flags, p = self.connacks.get(timeout=timeout)
        if expect_success:
            assert not rc.is_failure, f"CONNACK refused: {rc}"
        return rc, flags, p

    def subscribe(self, topic, qos=0, options=None, properties=None):
        if options is not None:
            res, mid = self.c.subscribe(topic, options=options, properties=properties)
        else:
            res, mid = self.c.subscribe(topic, qos, properties=properties)
        assert res == mqtt.MQTT_ERR_SUCCESS
        got_mid, rcs = self.subacks.get(timeout=5)
        assert got_mid == mid
        return rcs

    def unsubscribe(self, topic):
        res, mid = self.c.unsubscribe(topic)
        got_mid, rcs = self.unsubacks.get(timeout=5)
        assert got_mid == mid
        return rcs

    def publish(self, topic, payload=b"", qos=0, retain=False, properties=None, wait=True):
        info = self.c.publish(topic, payload, qos, retain, properties=properties)
        if wait and qos > 0:
            info.wait_for_publish(timeout=5)
            assert info.is_published(), f"no acknowledgement for {topic}"
        return info

    def get(self, timeout=5):
        return self.messages.get(timeout=timeout)

    def drain(self, n, timeout=10):
        return [self.get(timeout) for _ in range(n)]

    def assert_no_message(self, wait=0.5):
        try:
            m = self.messages.get(timeout=wait)
        except queue.Empty:
            return
        raise AssertionError(f"unexpected message on {m.topic}: {m.payload!r}")

    def disconnect(self, properties=None, reasoncode=None):
        self.c.disconnect(reasoncode=reasoncode, properties=properties)
        self.disconnects.get(timeout=5)
        self.c.loop_stop()
        # paho closes its socket right after writing DISCONNECT, without waiting
        # for the hub; give the hub a moment to process it before the test's next
        # step depends on the session being offline.
        time.sleep(0.2)

    def kill(self):
        """Drop the TCP connection without DISCONNECT, as a crashed device would."""
        sock = self.c.socket()
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.c.loop_stop()


@pytest.fixture(params=["tcp", "tls"])
def transport(request):
    """Every test built on client_factory runs over plain TCP and over TLS
    (trusting the generated CA); tests may still pin a transport."""
    return request.param


@pytest.fixture
def client_factory(hub, transport):
    made = []

    def make(*a, target=None, **kw):
        kw.setdefault("transport", transport)
        c = Client(target or hub, *a, **kw)
        made.append(c)
        return c

    yield make
    for c in made:
        try:
            c.c.loop_stop()
            c.c.disconnect()
        except Exception:
            pass


__all__ = ["Client", "Hub", "props", "PacketTypes", "ssl"]
