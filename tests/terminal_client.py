"""A small terminal WebSocket client for tests: connect with a cookie, type, read until."""

from __future__ import annotations

import json
import time

from tornado.httpclient import HTTPRequest
from tornado.websocket import WebSocketClientConnection, websocket_connect

from .conftest import Client


class TerminalClient:
    def __init__(self, connection: WebSocketClientConnection) -> None:
        self.connection = connection
        self.screen = ""  # everything received as output so far
        self.errors: list[str] = []
        self.progress: list[tuple[str, int]] = []  # (message, length of the screen when it came)

    @classmethod
    async def open(cls, client: Client, tab: str = "1", origin: str | None = None,
                   query: str | None = None, path: str = "/terminal/ws") -> TerminalClient:
        url = client.base_url.replace("http", "ws", 1) + path + "?" + (query or f"tabId={tab}")
        headers = {"Cookie": client.cookie_header()}
        if origin:
            headers["Origin"] = origin
        connection = await websocket_connect(HTTPRequest(url, headers=headers), max_message_size=64 * 1024 * 1024)
        return cls(connection)

    async def send(self, frame: dict | str) -> None:
        await self.connection.write_message(frame if isinstance(frame, str) else json.dumps(frame))

    async def type(self, text: str) -> None:
        await self.send({"type": "pty-input", "data": {"input": text}})

    async def resize(self, rows: int, cols: int) -> None:
        await self.send({"type": "resize", "data": {"rows": rows, "cols": cols}})

    async def read_frame(self, timeout: float) -> dict | None:
        import asyncio

        message = await asyncio.wait_for(self.connection.read_message(), timeout)
        if message is None:
            return None
        frame = json.loads(message)
        if frame["type"] == "pty-output":
            self.screen += frame["data"]["output"]
        elif frame["type"] == "error":
            self.errors.append(frame["data"]["message"])
        elif frame["type"] == "progress":
            self.progress.append((frame["data"]["message"], len(self.screen)))
        return frame

    async def read_until(self, needle: str, timeout: float = 15) -> str:
        """Read output until `needle` appears after the current point; returns the new output."""
        start = len(self.screen)
        deadline = time.monotonic() + timeout
        while needle not in self.screen[start:]:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"{needle!r} never arrived; got {self.screen[start:][-500:]!r}")
            try:
                frame = await self.read_frame(remaining)
            except TimeoutError:
                continue
            if frame is None:
                raise AssertionError(f"socket closed before {needle!r}; got {self.screen[start:][-500:]!r}")
        return self.screen[start:]

    async def read_error(self, timeout: float = 15) -> str:
        deadline = time.monotonic() + timeout
        while not self.errors:
            frame = await self.read_frame(max(0.01, deadline - time.monotonic()))
            if frame is None:
                raise AssertionError(f"closed without an error frame; saw {self.screen[-300:]!r}")
        return self.errors.pop(0)

    async def run(self, command: str, marker: str, timeout: float = 15) -> str:
        """Type a command line and read until its output shows `marker`.

        The marker must not be part of the command itself: input typed before `docker exec`
        has put the PTY in raw mode is echoed by the host's line discipline, which would
        make the command's own text look like its output.
        """
        assert marker not in command, (command, marker)
        await self.type(command + "\r")
        return await self.read_until(marker, timeout)

    def close(self) -> None:
        self.connection.close()
