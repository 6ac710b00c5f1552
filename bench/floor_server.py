"""The Python floor: the least a Python server can do to relay a terminal over a WebSocket.

    python -m bench.floor_server --port P --spec-dir DIR

`ws://127.0.0.1:P/ws/<name>` spawns, for each connection, the command in `DIR/<name>.json`
(as for bench/terminado_server.py) and speaks this server's own JSON frames (`pty-input`
and `resize` in, `pty-output` out). Nothing else: no framework, no sign-in, no limits, no
coalescing, no flow control beyond pausing the PTY while the socket's buffer is full. One
asyncio protocol per connection: the handshake and RFC 6455 frames by hand (Tornado's C
mask), the PTY's descriptor read by the loop and each read sent as one frame at once.

It is not a server to run: `bench.echo` measures it beside ours and ttyd to show how much of
a keystroke's time any Python server of this shape spends, whatever its framework.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import os
import signal
import struct
from pathlib import Path

from ptyprocess import PtyProcess
from tornado.speedups import websocket_mask

ACCEPT_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
MAX_HEAD = 16 * 1024
READ_CHUNK = 64 * 1024
TEXT, CLOSE = 0x1, 0x8


def frame(opcode: int, payload: bytes) -> bytes:
    n = len(payload)
    if n < 126:
        return struct.pack("!BB", 0x80 | opcode, n) + payload
    if n < 65536:
        return struct.pack("!BBH", 0x80 | opcode, 126, n) + payload
    return struct.pack("!BBQ", 0x80 | opcode, 127, n) + payload


def next_frame(buffer: bytearray) -> tuple[int, bytes] | None:
    """Take one whole masked client frame off the front of `buffer` (opcode, payload); None
    while it is incomplete."""
    if len(buffer) < 2:
        return None
    n, start = buffer[1] & 0x7F, 2
    if n == 126:
        if len(buffer) < 4:
            return None
        n, start = struct.unpack("!H", buffer[2:4])[0], 4
    elif n == 127:
        if len(buffer) < 10:
            return None
        n, start = struct.unpack("!Q", buffer[2:10])[0], 10
    end = start + 4 + n
    if len(buffer) < end:
        return None
    opcode = buffer[0] & 0x0F
    payload = websocket_mask(bytes(buffer[start:start + 4]), bytes(buffer[start + 4:end]))
    del buffer[:end]
    return opcode, payload


class Relay(asyncio.Protocol):
    def __init__(self, spec_dir: Path) -> None:
        self.spec_dir = spec_dir
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.proc: PtyProcess | None = None
        self.loop = asyncio.get_running_loop()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.proc is None:
            self.handshake()
            if self.proc is None:
                return
        while (message := next_frame(self.buffer)) is not None:
            self.on_frame(*message)

    def handshake(self) -> None:
        assert self.transport is not None
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buffer) > MAX_HEAD:
                self.transport.close()
            return
        lines = self.buffer[:end].decode("latin-1").split("\r\n")
        del self.buffer[:end + 4]
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        name = lines[0].split()[1].rsplit("/", 1)[-1]
        if not name.isalnum() or "sec-websocket-key" not in headers:
            self.transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
            self.transport.close()
            return
        accept = base64.b64encode(hashlib.sha1(headers["sec-websocket-key"].encode() + ACCEPT_GUID).digest())
        spec = json.loads((self.spec_dir / f"{name}.json").read_text())
        self.proc = PtyProcess.spawn(spec["argv"], env=spec.get("env"), cwd=spec.get("cwd"), dimensions=(24, 80))
        os.set_blocking(self.proc.fd, False)
        self.transport.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                             b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n")
        self.loop.add_reader(self.proc.fd, self.on_pty)

    def on_frame(self, opcode: int, payload: bytes) -> None:
        assert self.proc is not None and self.transport is not None
        if opcode == CLOSE:
            self.transport.write(frame(CLOSE, payload[:2]))
            self.transport.close()
        elif opcode == TEXT:
            message = json.loads(payload)
            if message["type"] == "pty-input":
                os.write(self.proc.fd, message["data"]["input"].encode())
            elif message["type"] == "resize":
                self.proc.setwinsize(message["data"]["rows"], message["data"]["cols"])

    def on_pty(self) -> None:
        assert self.proc is not None and self.transport is not None
        try:
            data = os.read(self.proc.fd, READ_CHUNK)
        except BlockingIOError:
            return
        except OSError:  # EIO: the program ended
            data = b""
        if not data:
            self.loop.remove_reader(self.proc.fd)
            self.transport.close()
            return
        text = data.decode("utf-8", "replace")  # a character split between reads is mangled; a floor can afford that
        body = json.dumps({"type": "pty-output", "data": {"output": text}}, ensure_ascii=False).encode()
        self.transport.write(frame(TEXT, body))

    def pause_writing(self) -> None:
        if self.proc is not None:
            self.loop.remove_reader(self.proc.fd)

    def resume_writing(self) -> None:
        if self.proc is not None and not self.proc.closed:
            self.loop.add_reader(self.proc.fd, self.on_pty)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.proc is not None and not self.proc.closed:
            self.loop.remove_reader(self.proc.fd)
            self.proc.close(force=True)  # SIGHUP, then SIGKILL: the tmux client detaches


async def serve(port: int, spec_dir: Path) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Relay(spec_dir), "127.0.0.1", port)
    stopping = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    await stopping.wait()
    server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--spec-dir", type=Path, required=True)
    args = parser.parse_args()
    asyncio.run(serve(args.port, args.spec_dir))


if __name__ == "__main__":
    main()
