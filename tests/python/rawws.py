"""A minimal hand-built WebSocket client (RFC 6455), to control exactly how a
byte stream is cut into frames and messages."""

import base64
import hashlib
import os
import socket
import ssl
import struct

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
BINARY, CONTINUATION, TEXT, CLOSE, PING, PONG = 0x2, 0x0, 0x1, 0x8, 0x9, 0xA


class Refused(Exception):
    def __init__(self, status, headers, body):
        super().__init__(f"{status}: {body!r}")
        self.status, self.headers, self.body = status, headers, body


class RawWs:
    def __init__(self, port, protocol="mqtt", ca=None, path="/$iothub/websocket", timeout=5, extra=""):
        sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        if ca:
            sock = ssl.create_default_context(cafile=str(ca)).wrap_socket(sock, server_hostname="localhost")
        self.sock = sock
        key = base64.b64encode(os.urandom(16))
        lines = [f"GET {path} HTTP/1.1", "Host: localhost", "Upgrade: websocket", "Connection: Upgrade",
                 f"Sec-WebSocket-Key: {key.decode()}", "Sec-WebSocket-Version: 13"]
        if protocol:
            lines.append(f"Sec-WebSocket-Protocol: {protocol}")
        sock.sendall(("\r\n".join(lines) + "\r\n" + extra + "\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(1)
            if not chunk:
                raise ConnectionError(f"closed during the handshake after {head!r}")
            head += chunk
        status_line, *header_lines = head.decode().split("\r\n")
        status = int(status_line.split()[1])
        self.headers = {k.strip().lower(): v.strip() for k, v in
                        (h.split(":", 1) for h in header_lines if ":" in h)}
        if status != 101:
            body = b""
            n = int(self.headers.get("content-length", "0"))
            while len(body) < n:
                body += sock.recv(n - len(body))
            sock.close()
            raise Refused(status, self.headers, body.decode())
        expected = base64.b64encode(hashlib.sha1(key + GUID).digest()).decode()
        assert self.headers["sec-websocket-accept"] == expected, self.headers
        self.buf = b""

    def send_frame(self, opcode, payload, fin=True):
        mask = os.urandom(4)
        n = len(payload)
        head = bytes([(0x80 if fin else 0) | opcode])
        if n < 126:
            head += bytes([0x80 | n])
        elif n < 65536:
            head += bytes([0x80 | 126]) + struct.pack("!H", n)
        else:
            head += bytes([0x80 | 127]) + struct.pack("!Q", n)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(head + mask + masked)

    def send(self, data):
        self.send_frame(BINARY, data)

    def _exact(self, n):
        out = b""
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise ConnectionError("closed")
            out += chunk
        return out

    def recv_frame(self):
        """(fin, opcode, payload); server frames are never masked."""
        b0, b1 = self._exact(2)
        assert not b1 & 0x80, "a server frame must not be masked"
        n = b1 & 0x7F
        if n == 126:
            n = struct.unpack("!H", self._exact(2))[0]
        elif n == 127:
            n = struct.unpack("!Q", self._exact(8))[0]
        return bool(b0 & 0x80), b0 & 0x0F, self._exact(n)

    def read_packet(self, frames=None):
        """The next MQTT packet from the byte stream of binary messages;
        control frames seen on the way go to `frames` when given."""
        while True:
            if len(self.buf) >= 2:
                n, mult, i = 0, 1, 1
                while i < len(self.buf):
                    b = self.buf[i]
                    n += (b & 0x7F) * mult
                    mult *= 128
                    i += 1
                    if not b & 0x80:
                        break
                else:
                    i = None
                if i is not None and len(self.buf) >= i + n:
                    first, body = self.buf[0], self.buf[i:i + n]
                    self.buf = self.buf[i + n:]
                    return first, body
            fin, op, payload = self.recv_frame()
            if op in (BINARY, CONTINUATION):
                self.buf += payload
            elif frames is not None:
                frames.append((op, payload))
            if op == CLOSE:
                return None

    def close(self):
        self.sock.close()
