"""MQTT over QUIC with aioquic, an independent QUIC implementation: hand-built
MQTT packets (rawmqtt) on the first bidirectional stream, as EMQX's
single-stream mode and its clients do."""

import asyncio
import ssl

from aioquic.asyncio import connect
from aioquic.quic.configuration import QuicConfiguration


class QuicMqtt:
    """One QUIC connection and its MQTT stream."""

    @classmethod
    async def open(cls, port, ca, alpn="mqtt", server_name="localhost"):
        cfg = QuicConfiguration(is_client=True, alpn_protocols=[alpn], server_name=server_name,
                                idle_timeout=30)
        cfg.load_verify_locations(str(ca))
        cfg.verify_mode = ssl.CERT_REQUIRED
        self = cls()
        self._cm = connect("127.0.0.1", port, configuration=cfg, wait_connected=True)
        self.protocol = await asyncio.wait_for(self._cm.__aenter__(), 10)
        self.reader, self.writer = await self.protocol.create_stream()
        return self

    def send(self, data):
        self.writer.write(data)

    async def read_packet(self, timeout=5):
        """(first byte, body), or None when the hub ended the stream."""
        try:
            first = await asyncio.wait_for(self.reader.readexactly(1), timeout)
            n, mult = 0, 1
            while True:
                b = (await asyncio.wait_for(self.reader.readexactly(1), timeout))[0]
                n += (b & 0x7F) * mult
                mult *= 128
                if not b & 0x80:
                    break
            body = await asyncio.wait_for(self.reader.readexactly(n), timeout) if n else b""
            return first[0], body
        except asyncio.IncompleteReadError:
            return None

    async def close(self):
        try:
            self.writer.close()
        except (RuntimeError, ValueError):
            pass  # the hub already ended or reset the stream
        self.protocol.close()
        await self._cm.__aexit__(None, None, None)
