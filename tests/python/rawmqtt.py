"""Minimal hand-built MQTT packets, to see exactly which bytes the hub answers with."""

import socket
import struct


def varint(n):
    out = bytearray()
    while True:
        b = n % 128
        n //= 128
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def s(v):
    v = v.encode() if isinstance(v, str) else v
    return struct.pack("!H", len(v)) + v


def packet(first, body):
    return bytes([first]) + varint(len(body)) + body


def connect(client_id="raw", version=4, keepalive=30, clean=True, username=None, password=None, props=b""):
    flags = (0x02 if clean else 0) | (0x80 if username is not None else 0) | (0x40 if password is not None else 0)
    body = s("MQTT") + bytes([version, flags]) + struct.pack("!H", keepalive)
    if version == 5:
        body += varint(len(props)) + props
    body += s(client_id)
    if username is not None:
        body += s(username)
    if password is not None:
        body += s(password)
    return packet(0x10, body)


def open_conn(port, timeout=5):
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    return sock


def read_packet(sock):
    """Returns (first byte, body) or None when the hub closed the connection."""
    first = sock.recv(1)
    if not first:
        return None
    n, mult = 0, 1
    while True:
        b = sock.recv(1)
        if not b:
            return None
        n += (b[0] & 0x7F) * mult
        mult *= 128
        if not b[0] & 0x80:
            break
    body = b""
    while len(body) < n:
        chunk = sock.recv(n - len(body))
        if not chunk:
            return None
        body += chunk
    return first[0], body


def closed(sock, timeout=5):
    """True when the hub closes the socket (EOF or reset) within `timeout`."""
    sock.settimeout(timeout)
    try:
        while True:
            data = sock.recv(4096)
            if not data:
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except socket.timeout:
        return False
